"""A streamed run (blocks read from the checkpoint one at a time, written to the export as they finish) writes the
same bytes as a resident run, for every block-scope recipe, family and format; what it cannot do is refused first."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.formats.files import RECORD_FILE
from lowbit.run import ExportSettings
from lowbit.synthetic import write_synthetic_checkpoint

VOCAB = 320  # the conftest tokenizer's
SHAPE = {"hidden_size": 64, "intermediate_size": 96, "num_layers": 3, "num_heads": 4, "vocab_size": VOCAB}
FAST = {
    "signround": {"iters": 4},
    "omniquant": {"epochs": 1},
    "desv": {"epochs": 1},
    "teq": {"steps": 4, "loss": "mse"},
}
DATA = {"dataset": "builtin", "nsamples": 4, "seqlen": 32}


def checkpoint(path: Path, tokenizer_dir: Path, family: str = "llama", dtype=torch.bfloat16, tie=False, **kw) -> Path:
    overrides = {"qwen3_moe": {"num_experts": 4}, "gemma3": {"layer_types": ["sliding_attention", "full_attention",
                 "sliding_attention"], "sliding_window": 8}}.get(family)  # fmt: skip
    kv_heads = 4 if family == "opt" else 2
    return write_synthetic_checkpoint(path, family=family, num_kv_heads=kv_heads, dtype=dtype,
                                      tie_word_embeddings=tie, tokenizer_dir=tokenizer_dir,
                                      config_overrides=overrides, **SHAPE, **kw)  # fmt: skip


def digests(directory: Path) -> dict[str, str]:
    """sha256 of every file of an export but the run record (it holds timings)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != RECORD_FILE
    }


def export(model_dir: Path, out: Path, stream: str, recipe: str, scheme: str, fmt: str = "auto", **kw) -> Path:
    options = {"engine": {"stream": stream, "progress": False}}
    for name in recipe.split("+"):
        if name in FAST:
            options[name] = FAST[name]
    lowbit.quantize_to(out, model=str(model_dir), recipe=recipe, scheme=scheme, options=options, seed=1,
                       export=ExportSettings(format=fmt, **kw), **DATA)  # fmt: skip
    return out


def assert_stream_matches(model_dir: Path, tmp_path: Path, recipe: str, scheme: str, fmt: str = "auto", **kw):
    resident = export(model_dir, tmp_path / "resident" / "out", "off", recipe, scheme, fmt, **kw)
    streamed = export(model_dir, tmp_path / "streamed" / "out", "on", recipe, scheme, fmt, **kw)  # same card
    assert digests(streamed) == digests(resident)
    return streamed


@pytest.mark.parametrize(
    "recipe, scheme",
    [("rtn", "w4g32"), ("gptq", "w4g32"), ("awq+rtn", "w4g32"), ("signround", "w4g32"), ("omniquant", "w3g32"),
     ("desv", "w3g32"), ("teq+rtn", "w4g32"), ("hqq", "w3g32")],
)  # fmt: skip
def test_stream_equals_resident_for_every_block_recipe(tmp_path, tokenizer_dir, recipe, scheme):
    model_dir = checkpoint(tmp_path / "ckpt", tokenizer_dir)
    assert_stream_matches(model_dir, tmp_path, recipe, scheme)


@pytest.mark.parametrize(
    "family, dtype, tie",
    [("llama", torch.float16, True), ("opt", torch.bfloat16, False), ("gemma3", torch.bfloat16, True),
     ("phi3", torch.float16, False), ("qwen3_moe", torch.bfloat16, False), ("qwen3", torch.bfloat16, False)],
)  # fmt: skip
def test_stream_equals_resident_for_every_family(tmp_path, tokenizer_dir, family, dtype, tie):
    model_dir = checkpoint(tmp_path / "ckpt", tokenizer_dir, family, dtype, tie, max_shard_bytes=20_000)
    scheme = "w4g32-sym" if family == "qwen3_moe" else "w4g32"  # compressed-tensors experts are symmetric
    assert_stream_matches(model_dir, tmp_path, "gptq", scheme)


@pytest.mark.parametrize("fmt", ["fake", "compressed-tensors", "gptq"])
def test_stream_equals_resident_for_every_format_and_sharded(tmp_path, tokenizer_dir, fmt):
    model_dir = checkpoint(tmp_path / "ckpt", tokenizer_dir, max_shard_bytes=30_000)
    scheme = "w4g32-sym" if fmt == "gptq" else "w4g32"
    streamed = assert_stream_matches(model_dir, tmp_path, "rtn", scheme, fmt, max_shard_size="40KB")
    assert (streamed / "model.safetensors.index.json").is_file()


def test_streamed_export_loads_like_the_resident_one(tmp_path, tokenizer_dir):
    model_dir = checkpoint(tmp_path / "ckpt", tokenizer_dir)
    streamed = export(model_dir, tmp_path / "streamed", "on", "gptq", "w4g32", "compressed-tensors")
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    loaded = lowbit.load(str(streamed))
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits
    assert torch.isfinite(logits).all() and logits.shape == (1, 12, VOCAB)


def test_what_a_streamed_run_cannot_do_is_refused_before_loading(tmp_path, tokenizer_dir, monkeypatch):
    model_dir = checkpoint(tmp_path / "ckpt", tokenizer_dir)

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr("lowbit.models.load_streamed", forbidden)
    stream = {"engine": {"stream": "on"}}
    with pytest.raises(LowbitError, match="--out"):
        lowbit.quantize_to(None, model=str(model_dir), recipe="rtn", options=stream)
    with pytest.raises(LowbitError, match="whole model"):
        lowbit.quantize_to(tmp_path / "a", model=str(model_dir), recipe="awq+invarexplore+rtn", options=stream)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_streamed_result_has_no_blocks_to_save(tmp_path, tokenizer_dir):
    model_dir = checkpoint(tmp_path / "ckpt", tokenizer_dir)
    result = lowbit.quantize_to(tmp_path / "out", model=str(model_dir), recipe="rtn", scheme="w4g32",
                                options={"engine": {"stream": "on"}})  # fmt: skip
    assert result.streamed and result.record["format"] == "compressed-tensors"
    assert all(r.codes.is_meta and r.scale.is_meta for r in result.weights.values())  # nothing grows with depth
    with pytest.raises(LowbitError, match="streamed"):
        result.save(tmp_path / "again")


def cli(model_dir: Path, out: Path, recipe: str, *extra: str) -> list[str]:
    return ["quantize", str(model_dir), "--recipe", recipe, "--scheme", "w4g32", "--dataset", "builtin",
            "--nsamples", "4", "--seqlen", "32", "--seed", "1", "--out", str(out), "--max-shard-size", "30KB",
            "--opt", "engine.stream=on", "--opt", "engine.progress=false", *extra]  # fmt: skip


def export_files(directory: Path) -> dict[str, str]:
    """sha256 of every file but the run record (timings) and the model card (it names its folder)."""
    return {name: digest for name, digest in digests(directory).items() if name != "README.md"}


def interrupt_after_block(monkeypatch, after: int | None = None) -> Callable:
    """Make a streamed run stop (KeyboardInterrupt) right after block `after` is checkpointed (None: the first);
    returns the original `StreamCheckpoint.save`."""
    from lowbit.engine.stream_checkpoint import StreamCheckpoint

    original = StreamCheckpoint.save

    def save(self, index, *args, **kwargs):
        original(self, index, *args, **kwargs)
        if after is None or index == after:
            raise KeyboardInterrupt

    monkeypatch.setattr(StreamCheckpoint, "save", save)
    return original


@pytest.mark.parametrize("recipe, after", [("gptq", 0), ("signround", 1), ("rtn", 1), ("hqq", 1)])
def test_interrupted_streamed_run_resumes_to_the_same_bytes(tmp_path, tokenizer_dir, monkeypatch, recipe, after):
    from lowbit.cli import main
    from lowbit.engine.workdir import work_dir_for

    model_dir = checkpoint(tmp_path / "ckpt", tokenizer_dir, max_shard_bytes=20_000)
    reference, out = tmp_path / "reference", tmp_path / "out"
    extra = ("--opt", "signround.iters=4") if recipe == "signround" else ()
    assert main(cli(model_dir, reference, recipe, "--no-checkpoint", *extra)) == 0

    interrupt_after_block(monkeypatch, after)
    assert main(cli(model_dir, out, recipe, *extra)) == 130
    monkeypatch.undo()
    work = work_dir_for(out)
    assert not out.exists() and (work / "export").is_dir()
    assert main(cli(model_dir, out, recipe, "--resume", *extra)) == 0
    assert export_files(out) == export_files(reference)
    assert not work.exists()


def test_kill_9_mid_stream_then_resume(tmp_path, tokenizer_dir):
    """A real SIGKILL while the streamed run writes: --resume continues after the last finished block."""
    import signal
    import subprocess
    import sys
    import time

    from lowbit.cli import main
    from lowbit.engine.workdir import work_dir_for

    shape = {**SHAPE, "num_layers": 6}
    model_dir = write_synthetic_checkpoint(tmp_path / "ckpt", family="llama", num_kv_heads=2,
                                           tokenizer_dir=tokenizer_dir, max_shard_bytes=20_000, **shape)  # fmt: skip
    reference, out = tmp_path / "reference", tmp_path / "out"
    slow = ("--opt", "signround.iters=60")
    assert main(cli(model_dir, reference, "signround", "--no-checkpoint", *slow)) == 0
    process = subprocess.Popen([sys.executable, "-m", "lowbit", *cli(model_dir, out, "signround", *slow)],
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    second = work_dir_for(out) / "stream" / "block-0001.safetensors"
    deadline = time.monotonic() + 300
    while not second.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    if process.returncode == 0:
        pytest.skip("the run finished before the kill")
    assert not out.exists()
    assert main(cli(model_dir, out, "signround", "--resume", *slow)) == 0
    assert export_files(out) == export_files(reference)


def test_a_run_that_fits_nowhere_is_refused_before_loading_with_the_fix(tmp_path, tokenizer_dir, monkeypatch):
    from lowbit.cli import main

    model_dir = checkpoint(tmp_path / "ckpt", tokenizer_dir)
    monkeypatch.setattr("lowbit.planner.plan.available_memory", lambda: 300 * 2**20)  # less than the runtime itself

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr("lowbit.models.load_streamed", forbidden)
    monkeypatch.setattr("lowbit.run.load_model", forbidden)
    out = tmp_path / "out"
    assert main(cli(model_dir, out, "gptq")[:-4]) == 2  # engine.stream left at auto
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no output, no work directory, no lock


def test_auto_streams_when_the_resident_run_would_not_fit(tmp_path, tokenizer_dir, monkeypatch):
    from lowbit.planner.plan import ModelShape, estimate

    model_dir = checkpoint(tmp_path / "ckpt", tokenizer_dir)
    config = lowbit.config.build_config(recipe="rtn", scheme="w4g32")
    shape = ModelShape.from_config(model_dir)
    resident = estimate(shape, config, stream=False).required
    streamed = estimate(shape, config, stream=True).required
    assert streamed < resident
    monkeypatch.setattr("lowbit.planner.plan.available_memory", lambda: int((resident + streamed) / 2 / 0.85))
    result = lowbit.quantize_to(tmp_path / "out", model=str(model_dir), recipe="rtn", scheme="w4g32")
    assert result.streamed and result.record["memory"]["plan"]["mode"] == "stream"
    measured = result.record["memory"]["measured_mib"]
    assert measured["peak_rss_mib"] > 0
    phases = [measured["phases"][name]["peak_rss_mib"] for name in ("loaded", "stages")]  # high-water marks
    assert 0 < phases[0] <= phases[1] <= measured["peak_rss_mib"]


def test_lowbit_plan_prints_the_plan_without_loading(tmp_path, tokenizer_dir, monkeypatch, capsys):
    from lowbit.cli import main

    model_dir = checkpoint(tmp_path / "ckpt", tokenizer_dir)

    def forbidden(*args, **kwargs):
        raise AssertionError("lowbit plan loaded the model")

    monkeypatch.setattr("lowbit.models.load_model", forbidden)
    monkeypatch.setattr("lowbit.models.load_streamed", forbidden)
    plan_json = tmp_path / "plan.json"
    assert main(["plan", str(model_dir), "--recipe", "gptq", "--memory", "64GB", "--json", str(plan_json)]) == 0
    out = capsys.readouterr().out
    assert "block_loop" in out and "fits" in out
    assert json.loads(plan_json.read_text())["available_mib"] == pytest.approx(64e9 / 2**20, rel=1e-3)
    assert main(["plan", str(model_dir), "--recipe", "gptq", "--memory", "100MB"]) == 0
    assert "does not fit" in capsys.readouterr().out
