"""Checkpoint/resume and determinism: an interrupted run continued with --resume ends byte-identical to an
uninterrupted one; two runs with the same inputs and seed give byte-identical exports for every recipe."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import save_model_dir
from lowbit.cli import main
from lowbit.engine.workdir import GroupCheckpoint, work_dir_for
from lowbit.formats.files import CARD_FILE, RECORD_FILE

FAST = {
    "rtn": [],
    "gptq": [],
    "awq+rtn": ["awq.n_grid=4", "awq.clip_grid=4"],
    "signround": ["signround.iters=4", "signround.batch_size=2"],
    "teq+rtn": ["teq.loss=mse", "teq.steps=4"],
    "teq+gptq": ["teq.loss=ce", "teq.steps=4", "teq.eval_samples=2", "teq.checkpoint_every=2"],
    "omniquant": ["omniquant.epochs=1"],
    "let+gptq": ["let.epochs=1"],
    "desv": ["desv.epochs=1", "desv.omniquant_epochs=1"],
    "awq+invarexplore+rtn": [
        "awq.n_grid=4", "awq.clip_grid=4", "invarexplore.max_steps=12", "invarexplore.samples=4",
        "invarexplore.log_every=4", "invarexplore.monitored_layers=3",
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def three_block_dir(tmp_path_factory, tokenizer):
    """A tiny Llama with three blocks, so a resume restores some blocks and continues in the middle."""
    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip
    return save_model_dir(tmp_path_factory.mktemp("three-blocks"), LlamaForCausalLM(config).eval(), tokenizer)


def quantize(model_dir, text_file, out, recipe, *extra) -> int:
    opts = [arg for opt in FAST[recipe] for arg in ("--opt", opt)]
    args = [
        "quantize", model_dir, "--recipe", recipe, "--scheme", "w4g32", "--dataset", text_file,
        "--nsamples", "4", "--seqlen", "32", "--opt", "engine.progress=false", *opts, "--out", out, *extra,
    ]  # fmt: skip
    return main([str(arg) for arg in args])


def export_digest(directory) -> dict[str, str]:
    """sha256 of every file of an export but the run record (timings) and the model card (it names its path)."""
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.iterdir())
        if path.name not in (RECORD_FILE, CARD_FILE)
    }


class Interrupt:
    """Make the block loop stop (as Ctrl-C would) right after it checkpointed block `after` of group `group`."""

    def __init__(self, monkeypatch, after: int, group: int | None = None) -> None:
        original = GroupCheckpoint.save_block

        def save_block(checkpoint, index, *args, **kwargs):
            original(checkpoint, index, *args, **kwargs)
            if index == after and (group is None or checkpoint.path.name == f"g{group:02d}"):
                raise KeyboardInterrupt

        monkeypatch.setattr(GroupCheckpoint, "save_block", save_block)
        self.monkeypatch = monkeypatch

    def stop(self) -> None:
        self.monkeypatch.undo()


@pytest.mark.parametrize("recipe", ["gptq", "awq+rtn", "signround", "omniquant", "let+gptq", "teq+rtn"])
def test_interrupted_run_resumes_to_a_byte_identical_export(three_block_dir, text_file, tmp_path, monkeypatch, recipe):
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert quantize(three_block_dir, text_file, reference, recipe, "--no-checkpoint") == 0

    interrupt = Interrupt(monkeypatch, after=1)
    assert quantize(three_block_dir, text_file, out, recipe) == 130
    interrupt.stop()
    work = work_dir_for(out)
    assert not out.exists() and sorted(p.name for p in (work / "g00").iterdir() if p.name.startswith("block"))
    assert quantize(three_block_dir, text_file, out, recipe, "--resume") == 0

    assert export_digest(out) == export_digest(reference)
    assert not work.exists()  # removed once the export is written
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["checkpoints"]["resumed"] is True
    assert [m["block"] for m in next(iter(record["stages"].values()))] == [0, 1, 2]


def test_resume_after_a_model_stage_reloads_it(three_block_dir, text_file, tmp_path, monkeypatch):
    """teq (whole-model CE) then gptq: the crash is in gptq's block loop; the resumed run reloads TEQ's result."""
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert quantize(three_block_dir, text_file, reference, "teq+gptq", "--no-checkpoint") == 0
    interrupt = Interrupt(monkeypatch, after=0, group=1)
    assert quantize(three_block_dir, text_file, out, "teq+gptq") == 130
    interrupt.stop()
    assert (work_dir_for(out) / "g00" / "model.safetensors").is_file()
    assert quantize(three_block_dir, text_file, out, "teq+gptq", "--resume") == 0
    assert export_digest(out) == export_digest(reference)


def test_invarexplore_resumes_mid_search(three_block_dir, text_file, tmp_path, monkeypatch):
    """Interrupted inside the search (after a record checkpoint), the resumed search ends where the full one does."""
    from lowbit.methods.invarexplore.search import InvarSearch

    recipe = "awq+invarexplore+rtn"
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert quantize(three_block_dir, text_file, reference, recipe, "--no-checkpoint") == 0
    original = InvarSearch.step

    def step(search, index):
        if index == 9:  # steps 0-7 are in the record written at step 8
            raise KeyboardInterrupt
        return original(search, index)

    monkeypatch.setattr(InvarSearch, "step", step)
    assert quantize(three_block_dir, text_file, out, recipe) == 130
    monkeypatch.undo()
    assert (work_dir_for(out) / "g01" / "stage" / "invarexplore.safetensors").is_file()
    assert quantize(three_block_dir, text_file, out, recipe, "--resume") == 0
    assert export_digest(out) == export_digest(reference)


def test_mismatched_resume_is_refused_before_loading(three_block_dir, text_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    interrupt = Interrupt(monkeypatch, after=0)
    assert quantize(three_block_dir, text_file, out, "gptq") == 130
    interrupt.stop()
    capsys.readouterr()
    assert quantize(three_block_dir, text_file, out, "gptq", "--seed", "7", "--resume") == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "config.seed" in err and "--overwrite" in err
    assert quantize(three_block_dir, text_file, out, "gptq") == 2  # a leftover work dir needs --resume
    assert "--resume" in capsys.readouterr().err
    assert quantize(three_block_dir, text_file, out, "gptq", "--overwrite") == 0  # starts over
    assert not work_dir_for(out).exists()


def test_resume_on_other_calibration_data_is_refused(three_block_dir, text_file, tmp_path, monkeypatch, capsys):
    out, other = tmp_path / "out", tmp_path / "other.txt"
    other.write_text(text_file.read_text()[::-1])
    interrupt = Interrupt(monkeypatch, after=0)
    assert quantize(three_block_dir, text_file, out, "gptq") == 130
    interrupt.stop()
    capsys.readouterr()
    code = quantize(three_block_dir, other, out, "gptq", "--resume")
    assert code == 2 and "cannot resume" in capsys.readouterr().err


def test_resume_needs_out(three_block_dir, capsys):
    assert main(["quantize", str(three_block_dir), "--resume"]) == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", sorted(FAST))
def test_two_runs_give_byte_identical_exports(three_block_dir, text_file, tmp_path, recipe):
    first, second = tmp_path / "first", tmp_path / "second"
    assert quantize(three_block_dir, text_file, first, recipe) == 0
    assert quantize(three_block_dir, text_file, second, recipe, "--no-checkpoint") == 0
    assert export_digest(first) == export_digest(second)
    determinism = json.loads((first / RECORD_FILE).read_text())["determinism"]
    assert determinism["torch_threads"] == torch.get_num_threads()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_real_signal_stops_cleanly_and_resumes(three_block_dir, text_file, tmp_path, signum):
    """A real Ctrl-C / SIGTERM to a running `lowbit quantize`: exit 130, no output dir, a resumable work dir."""
    out = tmp_path / "out"
    slow = ["--opt", "signround.iters=150"]
    command = [
        sys.executable, "-m", "lowbit", "quantize", str(three_block_dir), "--recipe", "signround", "--scheme",
        "w4g32", "--dataset", str(text_file), "--nsamples", "4", "--seqlen", "32", *slow, "--out", str(out),
    ]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    first_block = work_dir_for(out) / "g00" / "block-0000.safetensors"
    deadline = time.monotonic() + 120
    while not first_block.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert process.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    assert not out.exists()
    assert main([*command[3:], "--resume"]) == 0
    assert (out / RECORD_FILE).is_file() and not work_dir_for(out).exists()
