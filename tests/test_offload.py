"""Activation chains on disk (engine.offload): the DiskChain reads and writes exactly what a tensor holds, a run with
its chains on disk writes the same bytes as one with them in RAM (resident and streamed, every call site of the
chains), its files are gone after the run and after an error, the planner offloads or names the fix, and the option
is no part of the fingerprint (a resumed run may switch it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from lowbit.config import build_config
from lowbit.engine import BlockContext, capture_block_inputs
from lowbit.engine.offload import ChainStore, DiskChain, load_chains, save_chains, to_device
from lowbit.engine.stream_checkpoint import StreamCheckpoint
from lowbit.errors import LowbitError
from lowbit.planner.plan import ModelShape, estimate, plan_run
from lowbit.quantization import resolve_offload, settings_fingerprint
from lowbit.run import ExportSettings
from test_stream_run import checkpoint, digests, interrupt_after_block

# every chain call site: SignRound's random sample indices, held-out samples and student targets, OmniQuant's
# augmented targets and LET statistics, TEQ's row lists, AWQ's recorded forward, GPTQ's residual chain
FAST = {
    "signround": {"iters": 4, "batch_size": 3, "micro_batch_size": 2, "best_select": "holdout", "holdout": 2,
                  "target_from": "student_input"},
    "omniquant": {"epochs": 1, "aug_loss": True, "batch_size": 2},
    "teq": {"steps": 3, "loss": "mse", "init": "ones"},
    "awq": {"n_grid": 5, "clip_grid": 5},
}  # fmt: skip
DATA = {"dataset": "builtin", "nsamples": 7, "seqlen": 16}  # batches of 3, 3 and 1: a partial last batch


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(tokenizer_dir)
    return checkpoint(tmp_path_factory.mktemp("ckpt") / "model", tokenizer_dir)


@pytest.fixture
def disk_chains(monkeypatch) -> list[Path]:
    """The path of every DiskChain created while the test runs."""
    created: list[Path] = []
    original = DiskChain.__init__

    def init(self, path, shape):
        original(self, path, shape)
        created.append(Path(path))

    monkeypatch.setattr(DiskChain, "__init__", init)
    return created


def quantize(model_dir: Path, out: Path, recipe: str, offload: str, stream: str = "off", **export) -> dict:
    options = {"engine": {"offload": offload, "stream": stream, "batch_size": 3, "progress": False}}
    options.update({name: FAST[name] for name in recipe.split("+") if name in FAST})
    result = lowbit.quantize_to(out, model=str(model_dir), recipe=recipe, scheme="w4g32", options=options, seed=1,
                                export=ExportSettings(**export), **DATA)  # fmt: skip
    return result.record


# --- DiskChain --------------------------------------------------------------------------------------------------


def test_disk_chain_round_trip_is_bit_exact(tmp_path):
    values = torch.randn(7, 5, 3, generator=torch.Generator().manual_seed(0))
    values[0, 0] = torch.tensor([-0.0, 1e-45, float("inf")])  # signed zero, a denormal, an infinity
    with ChainStore("disk", tmp_path) as store:
        chain = store.new(values.shape)
        assert isinstance(chain, DiskChain) and chain.shape == values.shape and chain.dtype == torch.float32
        for start in range(0, 7, 3):  # written batch by batch, the last one partial
            chain[start : start + 3] = values[start : start + 3]
        whole = chain[:]
        assert whole.view(torch.int32).equal(values.view(torch.int32))  # the bits, not just the values
        assert chain[2:5].equal(values[2:5]) and chain[-2:].equal(values[-2:]) and chain[::2].equal(values[::2])
        assert chain[3].equal(values[3]) and chain[torch.tensor(4)].equal(values[4]) and chain[-1].equal(values[-1])
        index = torch.tensor([5, 0, 1, 2, 2, 6])  # unsorted, repeated, with a consecutive run
        assert chain[index].equal(values[index]) and chain[[6, 3]].equal(values[[6, 3]])
        assert chain[1:1].shape == (0, 5, 3) and chain.numel() == values.numel() and chain.element_size() == 4
        chain[4] = torch.zeros(5, 3)
        assert chain[4].equal(torch.zeros(5, 3)) and chain[5].equal(values[5])
        with pytest.raises(IndexError):
            chain[torch.tensor([7])]
        with pytest.raises(TypeError):
            chain[values[:, 0, 0] > 0]  # a mask is no sample index
        with pytest.raises(ValueError):
            chain[0:2] = torch.zeros(3, 5, 3)


def test_disk_chain_is_read_without_mapping_its_file(tmp_path):
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps")
    with ChainStore("disk", tmp_path) as store:
        chain = store.new((4, 8, 8))
        chain[0:4] = torch.ones(4, 8, 8)
        _ = chain[torch.tensor([3, 1])], chain[:]
        assert str(chain.path) not in maps.read_text()  # mapped pages would count in the resident set
        assert (chain.path.stat().st_mode & 0o777) == 0o600


def test_chain_files_go_with_the_chain_and_the_store(tmp_path):
    with ChainStore("disk", tmp_path) as store:
        first, second = store.new((2, 3)), store.new((2, 3))
        directory, path = store.directory, first.path
        assert directory.parent == tmp_path and first.path.is_file()
        del first  # garbage: its file goes at once
        assert not path.exists() and second.path.is_file()
    assert not directory.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="closed"):
        second[0:1]
    assert isinstance(ChainStore("ram").new((2, 3)), torch.Tensor)
    with pytest.raises(LowbitError):
        ChainStore("auto")


def test_chains_saved_chunk_by_chunk_are_a_safetensors_file(tmp_path):
    q, fp = torch.randn(5, 4, 6), torch.randn(5, 4, 6)
    with ChainStore("disk", tmp_path / "chains") as store:
        disk_q = store.new(q.shape)
        disk_q[:] = q
        save_chains({"q": disk_q, "fp": fp}, tmp_path / "chain.safetensors")
        stored = load_file(tmp_path / "chain.safetensors")  # readable by safetensors itself
        assert stored["q"].equal(q) and stored["fp"].equal(fp)
        back = load_chains(tmp_path / "chain.safetensors", store)
        assert isinstance(back["q"], DiskChain) and back["q"][:].equal(q) and back["fp"][:].equal(fp)
        assert load_chains(tmp_path / "chain.safetensors", ChainStore())["fp"].equal(fp)
        assert to_device(disk_q, torch.device("cpu")) is disk_q  # on the CPU a stage reads it batch by batch
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(LowbitError, match="damaged"):
        load_chains(tmp_path / "bad.safetensors", ChainStore())


def test_capture_and_replay_fill_one_chain_per_batch(tmp_path, tiny_model):
    from lowbit.arch import arch_for
    from lowbit.scheme import parse_scheme

    arch, cpu = arch_for(tiny_model), torch.device("cpu")
    ids = torch.randint(3, 300, (5, 12), generator=torch.Generator().manual_seed(0))
    reference = capture_block_inputs(tiny_model, arch, ids, batch_size=2, device=cpu)
    with ChainStore("disk", tmp_path) as store:
        captured = capture_block_inputs(tiny_model, arch, ids, batch_size=2, device=cpu, chains=store)
        assert isinstance(captured.hidden, DiskChain) and captured.hidden[:].equal(reference.hidden)
        contexts = [
            BlockContext(0, "b0", arch.blocks(tiny_model)[0], arch, parse_scheme("w4g32"), captured.kwargs, cpu, 2, 0,
                         chains=chains)
            for chains in (ChainStore(), store)
        ]  # fmt: skip
        in_ram, on_disk = contexts[0].run(reference.hidden), contexts[1].run(captured.hidden)
        assert isinstance(in_ram, torch.Tensor) and isinstance(on_disk, DiskChain)
        assert on_disk[:].equal(in_ram)


# --- whole runs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["rtn", "gptq", "awq+rtn", "signround", "omniquant", "teq+rtn"])
def test_disk_chains_write_the_same_bytes_as_ram_resident_and_streamed(tmp_path, model_dir, disk_chains, recipe):
    reference = tmp_path / "ram" / "out"  # the same folder name: the model card names it
    quantize(model_dir, reference, recipe, "ram")
    assert not disk_chains
    for stream in ("off", "on"):
        out = tmp_path / f"disk-{stream}" / "out"
        record = quantize(model_dir, out, recipe, "disk", stream)
        assert digests(out) == digests(reference), stream
        if recipe != "rtn":  # RTN reads no calibration data: no chains at all
            assert record["chains"] == {"offload": "disk", "option": "disk"}
            assert disk_chains and not any(path.exists() or path.parent.exists() for path in disk_chains)
        assert [p.name for p in out.parent.iterdir()] == ["out"]  # no chain directory left beside the export


@pytest.mark.parametrize("checkpoints", [True, False])
def test_chain_files_go_when_a_run_fails_and_resumes_in_ram(tmp_path, model_dir, disk_chains, monkeypatch, checkpoints):
    from lowbit.methods.gptq.stage import GPTQ

    original = GPTQ.process_block

    def failing(self, ctx):
        if ctx.index == 1:
            raise RuntimeError("stopped in block 1")
        original(self, ctx)

    monkeypatch.setattr(GPTQ, "process_block", failing)
    with pytest.raises(RuntimeError, match="block 1"):
        quantize(model_dir, tmp_path / "out", "gptq", "disk", checkpoint=checkpoints)
    assert disk_chains and not any(path.exists() or path.parent.exists() for path in disk_chains)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ([".out.lowbit-work"] if checkpoints else [])  # block 0's checkpoint, no chain directory
    if checkpoints:  # resumed with the chains in RAM: the same bytes as a run that never stopped
        assert not list((tmp_path / ".out.lowbit-work").glob(".lowbit-chains-*"))
        monkeypatch.setattr(GPTQ, "process_block", original)
        quantize(model_dir, tmp_path / "out", "gptq", "ram", resume=True)
        quantize(model_dir, tmp_path / "reference" / "out", "gptq", "ram")
        assert digests(tmp_path / "out") == digests(tmp_path / "reference" / "out")


def test_auto_offloads_when_the_plan_says_the_chains_do_not_fit(tmp_path, model_dir, monkeypatch):
    monkeypatch.setattr("lowbit.planner.plan.AUTO_STREAM_FRACTION", 1e-9)  # any run is "too large": stream, offload
    options = {"engine": {"batch_size": 1, "progress": False}}
    result = lowbit.quantize_to(tmp_path / "out", model=str(model_dir), recipe="gptq", scheme="w4g32",
                                options=options, **DATA)  # fmt: skip
    assert result.streamed and result.record["chains"] == {"offload": "disk", "option": "auto"}
    assert result.record["memory"]["plan"]["settings"]["chains_on_disk"]
    assert result.record["config"]["options"]["engine"]["offload"] == "auto"


# --- the planner and the fingerprint ------------------------------------------------------------------------------


def _llama_shape() -> ModelShape:
    config = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 8,
              "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 32000,
              "torch_dtype": "bfloat16"}  # fmt: skip
    return ModelShape.from_config(config)


def test_planner_names_offload_when_the_chains_do_not_fit():
    shape = _llama_shape()
    config = build_config(recipe="signround", nsamples=512, seqlen=2048, options={"engine": {"offload": "ram"}})
    in_ram = estimate(shape, config, stream=False)
    on_disk = estimate(shape, config, stream=False, chains_on_disk=True)
    assert on_disk.phases["block_loop"]["chains"] <= 2 * 8 * 2048 * 2048 * 4  # at most a batch in and a batch out
    assert in_ram.required > 2 * on_disk.required  # the chains are what does not fit
    available = int(on_disk.required * 1.1)
    plan = plan_run(shape, config, stream_option="off", available=available)
    assert not plan.fits and "engine.offload=disk" in plan.refusal()
    auto = build_config(recipe="signround", nsamples=512, seqlen=2048)  # engine.offload=auto
    chosen = plan_run(shape, auto, stream_option="off", available=available)
    assert chosen.fits and chosen.settings["chains_on_disk"] and "chains on disk" in chosen.decision
    assert resolve_offload("auto", chosen) == "disk" and resolve_offload("ram", chosen) == "ram"
    roomy = plan_run(shape, auto, stream_option="off", available=4 * in_ram.required)
    assert not roomy.settings["chains_on_disk"] and resolve_offload("auto", roomy) == "ram"
    assert resolve_offload("auto", None) == "ram"  # no plan (a model passed in loaded): in RAM


def test_offload_is_no_part_of_the_fingerprint():
    prints = [settings_fingerprint(build_config(recipe="gptq", options={"engine": {"offload": value}}))
              for value in ("auto", "ram", "disk")]  # fmt: skip
    assert prints[0] == prints[1] == prints[2] and "offload" not in prints[0]["options"]["engine"]


def test_a_resumed_streamed_run_may_switch_to_disk_chains(tmp_path, model_dir, monkeypatch, disk_chains):
    """Interrupted with its chains in RAM, resumed with them on disk: the saved chain is read into a DiskChain."""

    reference, out = tmp_path / "reference" / "out", tmp_path / "resumed" / "out"
    quantize(model_dir, reference, "gptq", "ram", "on", checkpoint=False)
    original = interrupt_after_block(monkeypatch, 0)
    with pytest.raises(KeyboardInterrupt):
        quantize(model_dir, out, "gptq", "ram", "on")
    monkeypatch.setattr(StreamCheckpoint, "save", original)  # undo() would also drop the disk_chains fixture's patch
    assert not disk_chains
    record = quantize(model_dir, out, "gptq", "disk", "on", resume=True)
    assert record["chains"]["offload"] == "disk" and disk_chains
    assert digests(out) == digests(reference)
    assert not any(path.exists() for path in disk_chains)
