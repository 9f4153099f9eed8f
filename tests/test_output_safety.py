"""Safe outputs and safe loading (issue 14): permissions, the per---out lock, disk-full mid-write, export size
estimates, preflight agreeing with export validation, and the opt-in flags for pickle weights and remote code."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowbit.arch import arch_for
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.export import prepare_packed
from lowbit.export.atomic import atomic_output_dir, output_lock
from lowbit.export.preflight import preflight_export
from lowbit.export.space import estimate_export_bytes
from lowbit.models import load_model
from lowbit.scheme import parse_scheme


def _tree_hash(directory: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def test_export_gets_normal_permissions_from_the_umask(tiny_llama_dir, tmp_path, umask_027):
    out = tmp_path / "out"
    assert main(["quantize", str(tiny_llama_dir), "--out", str(out)]) == 0
    assert out.stat().st_mode & 0o777 == 0o750
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes and set(modes.values()) == {0o640}, modes
    assert not (tmp_path / ".out.lock").exists()  # the lock file goes with the run


def test_lock_held_by_another_process_refuses_at_once(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from lowbit.export.atomic import output_lock\nwith output_lock({str(out)!r}):\n"
         "    print('locked', flush=True)\n    input()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["quantize", str(tiny_llama_dir), "--out", str(out)]) == 2
        assert "another lowbit run is writing" in capsys.readouterr().err
    finally:
        holder.communicate("\n", timeout=30)
    assert not out.exists() and not (tmp_path / ".out.lock").exists()
    with output_lock(out):  # free again once the holder exits
        pass


def test_parents_the_lock_created_are_removed_when_the_run_fails(tiny_llama_dir, tmp_path):
    out = tmp_path / "a" / "b" / "out"
    assert main(["quantize", str(tiny_llama_dir), "--scheme", "w9g128", "--out", str(out)]) == 2
    assert list(tmp_path.iterdir()) == []


def test_disk_full_while_writing_leaves_nothing_and_names_the_space(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    mount = tmp_path / "mnt"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        monkeypatch.setattr("lowbit.run.check_free_space", lambda out, needed: None)  # get past preflight
        before = _tree_hash(tiny_llama_dir)
        # --no-checkpoint: the export itself must hit the full disk, not the block checkpoints
        assert main(["quantize", str(tiny_llama_dir), "--no-checkpoint", "--out", str(mount / "out")]) == 2
        err = capsys.readouterr().err
        line = next(line for line in err.splitlines() if line.startswith("error:"))
        assert "disk full while writing" in line and "needs about" in line and "free" in line, line
        assert "Traceback" not in err
        assert list(mount.iterdir()) == []
        assert _tree_hash(tiny_llama_dir) == before
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_final_rename_refuses_a_directory_that_appeared_meanwhile(tmp_path):
    out = tmp_path / "out"
    with (
        pytest.raises(LowbitError, match="appeared while this run was writing"),
        atomic_output_dir(out, overwrite=False) as temp,
    ):
        (temp / "new.txt").write_text("ours")
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize(("fmt", "scheme"), [("fake", "w4g32"), ("compressed-tensors", "w4g32"), ("gptq", "w4g32-sym")])
def test_export_size_estimate_is_close(tiny_llama_dir, tmp_path, fmt, scheme):
    from lowbit import quantize

    result = quantize(str(tiny_llama_dir), recipe="rtn", scheme=scheme, options={"engine": {"progress": False}})
    estimate = estimate_export_bytes(result.model, result.config.scheme, fmt)
    out = result.save(tmp_path / "out", format=fmt)
    actual = (out / "model.safetensors").stat().st_size
    assert 0.85 * actual <= estimate <= 1.15 * actual, (estimate, actual)


@pytest.mark.parametrize(
    ("fmt", "scheme", "target", "ct_packing"),
    [
        ("compressed-tensors", "w4g128", "any", None),
        ("compressed-tensors", "w3g32", "any", None),
        ("compressed-tensors", "w3g32", "vllm-gpu", "dense"),
        ("compressed-tensors", "w4g32", "vllm-cpu", None),
        ("compressed-tensors", "w8a8", "any", None),
        ("gptq", "w3g32", "any", None),
        ("gptq", "w4g128-sym", "vllm-gpu", None),
        ("gptq", "w4g32-sym", "any", None),
    ],
)
def test_preflight_agrees_with_export_validation(tiny_llama_dir, fmt, scheme, target, ct_packing):
    """Same verdict and same first message as the export-time validation, without quantizing anything."""
    from lowbit import quantize

    loaded = load_model(str(tiny_llama_dir))
    quant_scheme = parse_scheme(scheme)
    try:
        preflight_export(loaded.model, arch_for(loaded.model), quant_scheme, fmt, target, 1, ct_packing)
        early = None
    except LowbitError as error:
        early = str(error)
    result = quantize(loaded, recipe="rtn", scheme=scheme, options={"engine": {"progress": False}})
    try:
        prepare_packed(
            result.model, result.weights, fmt, target=target, ct_packing=ct_packing, act_bits=quant_scheme.act_bits
        )
        late = None
    except LowbitError as error:
        late = str(error)
    assert early == late


def _pickle_dir(source: Path, path: Path) -> Path:
    shutil.copytree(source, path)
    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    return path


def test_allow_pickle_loads_pickle_weights(tiny_llama_dir, tmp_path, text_file):
    path = _pickle_dir(tiny_llama_dir, tmp_path / "pickled")
    reference = load_model(str(tiny_llama_dir)).model
    loaded = load_model(str(path), allow_pickle=True).model
    assert all(
        torch.equal(a, b) for a, b in zip(reference.state_dict().values(), loaded.state_dict().values(), strict=True)
    )
    args = ["eval", path, "--allow-pickle", "--ppl", text_file, "--eval-seqlen", "32", "--eval-windows", "1"]
    assert main([str(a) for a in args]) == 0


def test_safetensors_win_over_pickle_files(tiny_llama_dir, tmp_path):
    path = shutil.copytree(tiny_llama_dir, tmp_path / "both")
    (path / "pytorch_model.bin").write_bytes(b"never unpickled")
    assert load_model(str(path)).model is not None


REMOTE_CONFIG = "from transformers import LlamaConfig\n\n\nclass XConfig(LlamaConfig):\n    model_type = 'x-llama'\n"
REMOTE_MODEL = (
    "from transformers import LlamaForCausalLM\n\nfrom .configuration_x import XConfig\n\n\n"
    "class XForCausalLM(LlamaForCausalLM):\n    config_class = XConfig\n"
)


def test_trust_remote_code_is_passed_to_transformers(tiny_llama_dir, tmp_path):
    """transformers copies the model's code into its modules cache (outside the model directory) and imports it."""
    path = shutil.copytree(tiny_llama_dir, tmp_path / "lowbit_remote_code_test")
    (path / "configuration_x.py").write_text(REMOTE_CONFIG)
    (path / "modeling_x.py").write_text(REMOTE_MODEL)
    config = json.loads((path / "config.json").read_text())
    auto_map = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    config.update(model_type="x-llama", auto_map=auto_map)
    (path / "config.json").write_text(json.dumps(config))
    before = _tree_hash(path)
    with pytest.raises(LowbitError, match="--trust-remote-code"):
        load_model(str(path))
    loaded = load_model(str(path), trust_remote_code=True)
    assert type(loaded.model).__name__ == "XForCausalLM"
    assert _tree_hash(path) == before
