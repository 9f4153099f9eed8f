"""Data-parallel runs beyond the tiny Llama at 2 ranks (tests/test_distributed.py): a tiny Qwen3-MoE at 2 ranks and
the tiny Llama at 3 ranks with uneven shards write one process's export, and each rank's activation chains hold its
share of the samples (measured by the chain store, not estimated)."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch

from conftest import save_model_dir
from lowbit.cli import main
from lowbit.distributed import shard_bounds
from lowbit.engine.offload import ChainStore
from test_distributed import EVAL_ARGS, GPTQ_ARGS, TRAINED, _lowbit, _weights
from test_moe import make_moe


class _Measured(ChainStore):
    """A ChainStore that keeps every instance, so a test reads the single process's `peak_bytes` after its run."""

    made: list[ChainStore] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.made.append(self)


def _one_process(monkeypatch, args: tuple[object, ...], out: Path) -> int:
    """Run `lowbit quantize ARGS --out OUT` in this process; returns its chains' peak bytes."""
    monkeypatch.setattr(_Measured, "made", [])
    monkeypatch.setattr("lowbit.quantization.ChainStore", _Measured)
    assert main([*map(str, args), "--out", str(out)]) == 0
    (store,) = _Measured.made  # the block loop's store (no mixed-precision planning pass here)
    return store.peak_bytes


def _assert_chain_shares(record: dict, single: int, nsamples: int) -> None:
    """Each rank's chains peaked at its share of the single process's (n_r / n of it), within 10%."""
    per_rank = record["chains"]["peak_bytes_per_rank"]
    world = record["distributed"]["world_size"]
    assert len(per_rank) == world and single > 0
    for rank, peak in enumerate(per_rank):
        start, stop = shard_bounds(nsamples, rank, world)
        assert peak == pytest.approx(single * (stop - start) / nsamples, rel=0.1), (rank, per_rank, single)


def _code_agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    linears = [key for key in a if key.endswith("proj.weight")]  # every expert's and attention's linears
    return sum(int((a[key] == b[key]).sum()) for key in linears) / sum(a[key].numel() for key in linears)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, tokenizer) -> Path:
    """The tiny Qwen3-MoE of tests/test_moe.py (2 blocks, 4 experts, top-2) with the conftest tokenizer."""
    return save_model_dir(tmp_path_factory.mktemp("dist-moe"), make_moe(), tokenizer)


def test_chain_store_counts_the_chains_alive_at_once_in_ram_and_on_disk(tmp_path):
    for offload in ("ram", "disk"):
        with ChainStore(offload, tmp_path) as store:
            first = store.new((4, 8, 16))
            second = store.new((2, 8, 16))
            assert store.live_bytes == store.peak_bytes == 6 * 8 * 16 * 4
            del first
            gc.collect()
            third = store.new((1, 8, 16))
            assert store.live_bytes == 3 * 8 * 16 * 4 and store.peak_bytes == 6 * 8 * 16 * 4
            del second, third
            gc.collect()
            assert store.live_bytes == 0


def test_two_ranks_write_one_process_gptq_bytes_on_a_moe_with_half_the_chains_each(
    moe_dir, text_file, tmp_path, monkeypatch
):
    """exact_hessian on a mixture of experts: every expert's X^T X (its routed tokens only, a different count per
    rank) summed in fp64 in rank order is one process's H, so every tensor of the export is one process's."""
    args = ("quantize", moe_dir, "--dataset", text_file, *GPTQ_ARGS, "-q")
    single = _one_process(monkeypatch, args, tmp_path / "one")
    done = _lowbit(*args, "--out", tmp_path / "two", "--nproc", 2)
    assert done.returncode == 0, done.stderr
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert a.keys() == b.keys() and any(".mlp.experts.3.down_proj." in key for key in a)
    assert all(torch.equal(a[key], b[key]) for key in a)
    record = json.loads((tmp_path / "two" / "lowbit_record.json").read_text())
    assert record["distributed"]["samples_per_rank"] == [3, 3]
    _assert_chain_shares(record, single, 6)  # 6 samples: each rank's chains are half of one process's


def test_two_ranks_train_omniquant_on_a_moe_to_one_process_codes_and_perplexity(moe_dir, text_file, tmp_path):
    """AWQ and TEQ refuse Qwen3-MoE (their FFN scales fold into the norm that feeds the float router), so the
    trained block-wise stage here is OmniQuant (LWC + LET): the same global batches, the gradients summed at the
    block parameters over the ranks, so the codes and the perplexity are one process's."""
    args = ("quantize", moe_dir, "--dataset", text_file, *TRAINED["omniquant"], "--scheme", "w4g32", "--nsamples", 6,
            "--seqlen", 32, "--format", "fake", "-q", *EVAL_ARGS, "--eval-dataset", text_file)  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*map(str, args), "--out", str(one)]) == 0
    done = _lowbit(*args, "--out", two, "--nproc", 2)
    assert done.returncode == 0, done.stderr
    same = _code_agreement(_weights(one), _weights(two))
    assert same >= 0.999, same
    records = [json.loads((out / "lowbit_record.json").read_text()) for out in (one, two)]
    stages = [record["stages"] for record in records]
    first = [stage[next(iter(stage))][0]["omniquant"]["epoch_losses"][0] for stage in stages]
    assert first[1] == pytest.approx(first[0], rel=1e-5, abs=2e-8)  # block 0's first step: the same batch
    ppl = [next(iter(record["evaluation"]["after"].values()))["ppl"] for record in records]
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-3)


def test_three_ranks_with_uneven_shards_write_one_process_gptq_bytes(tiny_llama_dir, text_file, tmp_path, monkeypatch):
    """7 samples over 3 ranks (3, 2, 2): the exact Hessian does not depend on the split, and each rank's chains
    peak at its share of the samples."""
    args = ("quantize", tiny_llama_dir, "--dataset", text_file, *GPTQ_ARGS, "--nsamples", 7, "-q")
    single = _one_process(monkeypatch, args, tmp_path / "one")
    done = _lowbit(*args, "--out", tmp_path / "three", "--nproc", 3)
    assert done.returncode == 0, done.stderr
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "three")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
    record = json.loads((tmp_path / "three" / "lowbit_record.json").read_text())
    assert record["distributed"] == {"world_size": 3, "backend": "gloo", "samples_per_rank": [3, 2, 2]}
    _assert_chain_shares(record, single, 7)
