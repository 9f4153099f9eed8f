"""Data-parallel runs (lowbit/distributed): 2 ranks as processes on this machine (gloo, 1 thread each) write the
export one process writes, two 2-rank runs write the same bytes, and a failing rank ends the run with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowbit.cli import main
from lowbit.distributed import Group, shard_bounds
from lowbit.engine.workdir import work_dir_for
from lowbit.errors import LowbitError
from lowbit.run import ExportSettings, quantize_to

TESTS = Path(__file__).parent
GPTQ_ARGS = ("--recipe", "gptq", "--scheme", "w4g32", "--nsamples", "6", "--seqlen", "32", "--format", "fake",
             "--opt", "gptq.exact_hessian=true")  # fmt: skip
EVAL_ARGS = ("--eval", "--eval-seqlen", "32", "--eval-windows", "5")  # 3 + 2 windows on 2 ranks


def _env() -> dict[str, str]:
    src = str(TESTS.parent / "src")
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{src}{os.pathsep}{TESTS}{os.pathsep}{path}"}


def _lowbit(*args: object, launcher: tuple[str, ...] = ("-m", "lowbit")) -> subprocess.CompletedProcess:
    command = [sys.executable, *launcher, *map(str, args)]
    # the timeout guards against a hang, it is not a time limit: a tiny 2-rank run took over 120 s at load 9
    return subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=600, check=False)


def _torchrun(*args: object, script: tuple[str, ...] = ("-m", "lowbit")) -> subprocess.CompletedProcess:
    return _lowbit(*args, launcher=("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *script))


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


@pytest.fixture(scope="module")
def two_rank_gptq(tiny_llama_dir, text_file, tmp_path_factory) -> Path:
    """A GPTQ export written by `lowbit quantize --nproc 2`."""
    out = tmp_path_factory.mktemp("dist") / "two"
    done = _lowbit("quantize", tiny_llama_dir, "--dataset", text_file, *GPTQ_ARGS, "--out", out, "--nproc", 2, "-q",
                   *EVAL_ARGS, "--eval-dataset", text_file)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out


def test_shards_are_contiguous_slices_in_order_that_cover_every_sample():
    for total in range(0, 12):
        for world in (1, 2, 3, 5):
            bounds = [shard_bounds(total, rank, world) for rank in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
            sizes = [stop - start for start, stop in bounds]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_the_single_process_group_reduces_nothing():
    group = Group()
    x = torch.randn(3, 3)
    assert group.is_main and not group.distributed
    assert group.sum(x) is x and group.gather(x)[0] is x and group.gather_objects(7) == [7]
    assert group.shard(5) == slice(0, 5)


def test_two_ranks_write_the_export_of_one_process(two_rank_gptq, tiny_llama_dir, text_file, tmp_path, capsys):
    one = tmp_path / "one"
    assert main(["quantize", str(tiny_llama_dir), "--dataset", str(text_file), *GPTQ_ARGS, "--out", str(one),
                 *EVAL_ARGS, "--eval-dataset", str(text_file)]) == 0  # fmt: skip
    a, b = _weights(one), _weights(two_rank_gptq)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)  # exact_hessian: the same H, the same codes, any split
    assert not work_dir_for(two_rank_gptq).exists()  # checkpoints and rank logs gone after a success
    evaluation = [json.loads((out / "lowbit_record.json").read_text())["evaluation"] for out in (one, two_rank_gptq)]
    assert evaluation[0]["before"] == evaluation[1]["before"]  # the float model: each window's NLL, bit for bit
    ppl = [next(iter(record["after"].values()))["ppl"] for record in evaluation]
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-3)


def test_two_two_rank_runs_are_byte_identical_through_torchrun(two_rank_gptq, tiny_llama_dir, text_file, tmp_path):
    out = tmp_path / "again"
    done = _torchrun("quantize", tiny_llama_dir, "--dataset", text_file, *GPTQ_ARGS, "--out", out, "-q")
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors").read_bytes() == (two_rank_gptq / "model.safetensors").read_bytes()
    record = json.loads((out / "lowbit_record.json").read_text())
    assert record["distributed"] == {"world_size": 2, "backend": "gloo", "samples_per_rank": [3, 3]}


def test_a_stage_not_yet_data_parallel_is_refused_before_anything_loads(tiny_llama_dir, tmp_path):
    two = Group(rank=0, world_size=2, backend="gloo")  # refused before any collective or load
    from lowbit.engine.pipeline import check_data_parallel
    from lowbit.engine.stage import Stage

    class Waiting(Stage):  # every stage of lowbit runs data-parallel now: the refusal stays for a new one
        name, kind, scope, needs_data, summary = "waiting", "quantizer", "block", True, "not data-parallel"

    with pytest.raises(LowbitError, match="waiting does not run data-parallel yet"):
        check_data_parallel([Waiting(None, None)], 2)
    with pytest.raises(LowbitError, match="pass --out"):
        quantize_to(None, model=str(tiny_llama_dir), recipe="gptq", group=two)
    with pytest.raises(LowbitError, match="data-parallel streamed run keeps no checkpoints"):
        quantize_to(tmp_path / "out", model=str(tiny_llama_dir), recipe="gptq", group=two,
                    options={"engine": {"stream": "on"}}, export=ExportSettings(resume=True))  # fmt: skip


def test_nproc_refuses_before_starting_ranks_what_they_could_not_do(tiny_llama_dir, tmp_path, capsys):
    assert main(["quantize", str(tiny_llama_dir), "--nproc", "2", "-q"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: a data-parallel run (2 ranks) keeps each rank's log next to the export: pass --out"
    )
    if torch.cuda.device_count() < 3:
        out = str(tmp_path / "out")
        assert main(["quantize", str(tiny_llama_dir), "--nproc", "3", "--opt", "engine.device=cuda", "--out", out]) == 2
        assert "3 ranks with engine.device=cuda need as many GPUs" in capsys.readouterr().err


def test_a_failing_rank_ends_every_rank_with_one_error_line_and_the_run_resumes_to_the_same_bytes(
    two_rank_gptq, tiny_llama_dir, text_file, tmp_path
):
    out = tmp_path / "out"
    done = _torchrun("quantize", tiny_llama_dir, "--dataset", text_file, *GPTQ_ARGS, "--out", out, "-q",
                     script=(str(TESTS / "dist_rank_fails.py"), "raise"))  # fmt: skip
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    log = work_dir_for(out) / "logs" / "rank-1.log"
    assert errors == [f"error: rank 1 failed: RuntimeError: injected failure on rank 1 (its log: {log})"], done.stderr
    assert "injected failure on rank 1" in log.read_text() and not out.exists()
    assert (work_dir_for(out) / "g00" / "block-0000.safetensors").is_file()  # rank 0 finished block 0

    done = _lowbit("quantize", tiny_llama_dir, "--dataset", text_file, *GPTQ_ARGS, "--out", out, "-q", "--resume",
                   "--nproc", 2)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors").read_bytes() == (two_rank_gptq / "model.safetensors").read_bytes()
    assert not work_dir_for(out).exists()


def test_a_rank_that_stops_answering_ends_the_run_after_the_collective_timeout(tiny_llama_dir, text_file, tmp_path):
    out = tmp_path / "out"
    done = _torchrun("quantize", tiny_llama_dir, "--dataset", text_file, *GPTQ_ARGS, "--out", out, "-q",
                     "--dist-timeout", 3, script=(str(TESTS / "dist_rank_fails.py"), "hang"))  # fmt: skip
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "waited 3s (--dist-timeout) at a collective" in errors[0], done.stderr


def test_a_rank_killed_without_a_word_ends_the_run_with_one_line_naming_the_logs(tiny_llama_dir, text_file, tmp_path):
    out = tmp_path / "out"
    done = _torchrun("quantize", tiny_llama_dir, "--dataset", text_file, *GPTQ_ARGS, "--out", out, "-q",
                     script=(str(TESTS / "dist_rank_fails.py"), "kill"))  # fmt: skip
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(work_dir_for(out) / "logs") in errors[0], done.stderr


class _Rank:
    """A stand-in for one rank's `Group` in a single process: its offset among the given per-rank counts."""

    def __init__(self, rank: int, counts: list[int]) -> None:
        self.rank, self.counts, self.distributed = rank, counts, True

    def offset(self, count: int) -> tuple[int, int]:
        assert count == self.counts[self.rank]
        return sum(self.counts[: self.rank]), sum(self.counts)


@pytest.mark.parametrize("world", [2, 3])
def test_awq_sample_choices_on_every_rank_together_are_the_single_process_ones(world):
    from lowbit.methods.awq.clip import sample_tokens
    from lowbit.methods.awq.ranks import sampled_rows
    from lowbit.methods.awq.search import replay_samples

    n = 10
    x = torch.arange(n * 3 * 2, dtype=torch.float32).reshape(n, 3, 2)
    slices = [x[slice(*shard_bounds(n, rank, world))] for rank in range(world)]
    counts = [part.shape[0] for part in slices]
    spans = [(sum(counts[:rank]), n) for rank in range(world)]
    single, used = replay_samples(x, n, 4, None)
    parts = [replay_samples(part, part.shape[0], 4, None, span) for part, span in zip(slices, spans, strict=True)]
    assert torch.equal(torch.cat([part for part, _ in parts]), single) and {u for _, u in parts} == {used}
    flat = [replay_samples(p.reshape(-1, 2), p.shape[0], 4, None, s)[0] for p, s in zip(slices, spans, strict=True)]
    assert torch.equal(torch.cat(flat), replay_samples(x.reshape(-1, 2), n, 4, None)[0])
    rows = [sampled_rows(part, 7, _Rank(rank, [c * 3 for c in counts])) for rank, part in enumerate(slices)]
    assert torch.equal(torch.cat(rows), sample_tokens(x, 7))


def test_two_ranks_search_the_awq_scales_of_one_process(tiny_llama_dir, text_file, tmp_path):
    args = ("quantize", tiny_llama_dir, "--dataset", text_file, "--recipe", "awq+rtn", "--scheme", "w4g32",
            "--nsamples", 6, "--seqlen", 32, "--format", "fake", "-q", "--opt", "awq.search_samples=3",
            "--opt", "awq.clip_tokens=50")  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*map(str, args), "--out", str(one)]) == 0
    done = _lowbit(*args, "--out", two, "--nproc", 2)
    assert done.returncode == 0, done.stderr
    a, b = _weights(one), _weights(two)
    linears = [key for key in a if key.endswith("proj.weight")]
    same = sum(int((a[key] == b[key]).sum()) for key in linears)
    assert same >= 0.999 * sum(a[key].numel() for key in linears)
    assert all(torch.allclose(a[key], b[key], rtol=1e-5, atol=0) for key in a)  # norms: x̄ summed in another order
    records = [json.loads((out / "lowbit_record.json").read_text())["stages"]["awq+rtn"] for out in (one, two)]
    for block_one, block_two in zip(*records, strict=True):
        for prev, found in block_one["awq_scale"].items():
            assert block_two["awq_scale"][prev]["ratio"] == found["ratio"]
            assert block_two["awq_scale"][prev]["search_samples"] == found["search_samples"]
            assert block_two["awq_scale"][prev]["loss"] == pytest.approx(found["loss"], rel=1e-5)


def test_two_ranks_tune_signround_on_the_batches_of_one_process(tiny_llama_dir, text_file, tmp_path):
    """The same global batches and the summed loss: the first step's loss is the single process's exactly. SignSGD
    then follows the sign of a sum whose rounding order differs (as it does in one process between two micro-batch
    sizes: on this random tiny model the codes then differ widely), so the codes are not compared."""
    args = ("quantize", tiny_llama_dir, "--dataset", text_file, "--recipe", "signround", "--scheme", "w4g32",
            "--nsamples", 6, "--seqlen", 32, "--format", "fake", "-q", "--opt", "signround.iters=4",
            "--opt", "signround.batch_size=4", "--opt", "signround.micro_batch_size=2")  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*map(str, args), "--out", str(one)]) == 0
    done = _lowbit(*args, "--out", two, "--nproc", 2)
    assert done.returncode == 0, done.stderr
    records = [json.loads((out / "lowbit_record.json").read_text())["stages"]["signround"] for out in (one, two)]
    assert records[1][0]["loss_first"] == pytest.approx(records[0][0]["loss_first"], rel=1e-6)
    for block_one, block_two in zip(*records, strict=True):
        assert block_two["iters_run"] == block_one["iters_run"] == 4
        assert block_two["best_loss"] == pytest.approx(block_one["best_loss"], rel=0.2)


TRAINED = {  # one AdamW step per epoch on all 6 samples (3 per rank): the first epoch's loss is the first step's
    "omniquant": ("--recipe", "omniquant", "--opt", "omniquant.epochs=2", "--opt", "omniquant.batch_size=6",
                  "--opt", "omniquant.let=true"),
    "desv": ("--recipe", "desv", "--opt", "desv.epochs=1", "--opt", "desv.batch_size=6", "--opt", "desv.n=2"),
    "teq": ("--recipe", "teq+rtn", "--opt", "teq.loss=mse", "--opt", "teq.steps=3", "--opt", "teq.batch_size=4",
            "--opt", "teq.init=ones"),
    "teq-ce": ("--recipe", "teq+rtn", "--opt", "teq.steps=6", "--opt", "teq.eval_samples=3"),  # batch 1
}  # fmt: skip


def _first_loss(method: str, block: dict) -> float:
    if method == "omniquant":
        return block["omniquant"]["epoch_losses"][0]
    if method == "desv":
        return block["desv"]["omniquant"]["epoch_losses"][0]
    if method == "teq-ce":
        return block["inits"]["ones"]["loss_trace"][0][1]
    return block["teq"]["ones"]["loss_trace"][0][1]


@pytest.mark.parametrize("method", sorted(TRAINED))
def test_two_ranks_train_on_the_batches_of_one_process(method, tiny_llama_dir, text_file, tmp_path):
    """OmniQuant (LWC+LET), DESV, block-wise TEQ and TEQ-CE through the shared reductions: the same global batches,
    so the first step's loss is one process's; two 2-rank runs write the same bytes. AdamW then steps on a sum
    rounded in another order, but the gradients are summed at the block parameters, before the chain rule into LET's
    scales cancels large terms (engine/block_train.py: backward_through_leaves), so the codes agree as GPTQ's do."""
    args = ("quantize", tiny_llama_dir, "--dataset", text_file, *TRAINED[method], "--scheme", "w4g32",
            "--nsamples", 6, "--seqlen", 32, "--format", "fake", "-q")  # fmt: skip
    one, two, again = tmp_path / "one", tmp_path / "two", tmp_path / "again"
    assert main([*map(str, args), "--out", str(one)]) == 0
    done = _lowbit(*args, "--out", two, "--nproc", 2)
    assert done.returncode == 0, done.stderr
    done = _torchrun(*args, "--out", again)
    assert done.returncode == 0, done.stderr
    assert (again / "model.safetensors").read_bytes() == (two / "model.safetensors").read_bytes()
    stages = [json.loads((out / "lowbit_record.json").read_text())["stages"] for out in (one, two)]
    if method == "teq-ce":  # model scope: one record for the whole model
        first = [_first_loss(method, stage["teq"]) for stage in stages]
    else:  # block 0: later blocks' inputs come from blocks trained apart
        first = [_first_loss(method, stage[next(iter(stage))][0]) for stage in stages]
    assert first[1] == pytest.approx(first[0], rel=1e-5, abs=2e-8)  # the record rounds to 8 decimals
    a, b = _weights(one), _weights(two)
    linears = [key for key in a if key.endswith("proj.weight")]
    same = sum(int((a[key] == b[key]).sum()) for key in linears) / sum(a[key].numel() for key in linears)
    assert same >= 0.999, same  # measured: 1.0 for all three


def test_two_ranks_take_the_invarexplore_decisions_of_one_process(tiny_llama_dir, text_file, tmp_path):
    """The search batch split over the ranks, each proposal's CE and squared errors summed before the accept/reject:
    the same proposals are accepted as in one process with the same seed, so the folded model, and so the RTN
    export and the invariance record, are one process's bytes."""
    args = ("quantize", tiny_llama_dir, "--dataset", text_file, "--recipe", "invarexplore+rtn", "--scheme", "w2g32",
            "--nsamples", 6, "--seqlen", 32, "--format", "fake", "-q", "--opt", "invarexplore.samples=5",
            "--opt", "invarexplore.max_steps=40", "--opt", "invarexplore.log_every=10",
            "--opt", "invarexplore.monitored_layers=2")  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*map(str, args), "--out", str(one)]) == 0
    done = _lowbit(*args, "--out", two, "--nproc", 2)
    assert done.returncode == 0, done.stderr
    records = [json.loads((out / "lowbit_record.json").read_text())["stages"]["invarexplore"] for out in (one, two)]
    assert records[0]["accepts"] > 0 and records[1]["accepts"] == records[0]["accepts"]
    assert records[1]["accepts_per_layer"] == records[0]["accepts_per_layer"]
    assert records[1]["windows"] == [3, 32] and records[0]["windows"] == [5, 32]  # rank 0's slice of the batch
    assert records[1]["final_objective"] == pytest.approx(records[0]["final_objective"], rel=1e-6)  # fp32 sums
    for name in ("model.safetensors", "lowbit_artifacts.safetensors"):
        assert (two / name).read_bytes() == (one / name).read_bytes()


def test_a_two_rank_streamed_run_writes_the_two_rank_resident_bytes(two_rank_gptq, tiny_llama_dir, text_file, tmp_path):
    """Every rank streams each block from the checkpoint, rank 0 writes the shards as the blocks finish."""
    out = tmp_path / "streamed"
    done = _lowbit("quantize", tiny_llama_dir, "--dataset", text_file, *GPTQ_ARGS, "--out", out, "-q", "--nproc", 2,
                   "--opt", "engine.stream=on")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors").read_bytes() == (two_rank_gptq / "model.safetensors").read_bytes()
    record = json.loads((out / "lowbit_record.json").read_text())
    assert "stream" in record and record["distributed"]["world_size"] == 2


class _TwoRanks:
    """Rank 0 of two in one process: rank 1's loss, flags and flattened gradient are given (gather, then rank order)."""

    distributed, rank, world_size, is_main = True, 0, 2, True

    def __init__(self, loss: float, flags: list[bool], flat: torch.Tensor) -> None:
        self.other, self.flat = (loss, flags), flat

    def gather_objects(self, value):
        return [value, self.other]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor + self.flat


def test_gradients_are_summed_in_rank_order_and_a_tensor_no_rank_reached_keeps_none():
    from lowbit.engine.block_train import backward_through_leaves, detached_leaves, sum_over_ranks

    a, b, c = torch.ones(2, 2), torch.ones(3), torch.ones(1)
    other = torch.arange(7, dtype=torch.float32)  # rank 1 reached a (4) and b (3), not c
    loss, grads = sum_over_ranks(_TwoRanks(0.5, [True, True, False], other), 0.25, [a, None, None], [a, b, c])
    assert loss == 0.75 and grads[2] is None
    assert torch.equal(grads[0], 1 + other[:4].view(2, 2)) and torch.equal(grads[1], other[4:])

    scale = torch.full((2,), 2.0, requires_grad=True)  # the trainable tensor the block parameters are formed from
    weights = {"w": torch.ones(2) * scale, "frozen": torch.zeros(2)}
    leaves = detached_leaves(weights)
    assert leaves["frozen"] is weights["frozen"] and leaves["w"].is_leaf
    value = backward_through_leaves(_TwoRanks(1.0, [True], torch.tensor([3.0, 4.0])), leaves["w"].sum(), weights,
                                    leaves)  # fmt: skip
    assert value == 5.0 and torch.equal(scale.grad, torch.tensor([4.0, 5.0]))  # (1 + rank 1's) x d(w)/d(scale)
