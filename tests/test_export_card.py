"""`--format auto` (the default) and the model card: every export says how to load it, and that code works."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from lowbit.cli import main
from lowbit.export.card import model_card
from lowbit.formats.files import RECORD_FILE
from lowbit.runtime.load import load

CHECK = """
import torch
ids = torch.arange(3, 20)[None]
with torch.no_grad():
    logits = {model}(ids).logits
torch.save(logits, {path!r})
"""


def quantize(model_dir, out, *extra) -> dict:
    args = ["quantize", model_dir, "--recipe", "rtn", "--opt", "engine.progress=false", "--out", out, *extra]
    assert main([str(a) for a in args]) == 0
    return json.loads((out / RECORD_FILE).read_text())


def snippet(out, section: str) -> str:
    """The python block under `## <section>` of the export's README.md."""
    card = (out / "README.md").read_text()
    part = card.split(f"## {section}", 1)[1]
    return re.search(r"```python\n(.*?)```", part, re.S).group(1)


def run_snippet(code: str, tmp_path) -> torch.Tensor:
    """Run the card's code in a fresh interpreter (as a user would), then one forward.

    The card names the export as `./<name>`: the snippet runs from the folder that holds it (`tmp_path`).
    """
    path = tmp_path / "logits.pt"
    model = "model" if "model =" in code else "loaded.model"
    script = code + CHECK.format(model=model, path=str(path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(path)


@pytest.mark.parametrize(
    ("scheme", "extra", "fmt", "dequantize"),
    [
        ("w4g32", [], "compressed-tensors", True),  # asymmetric: needs CompressedTensorsConfig(dequantize=True)
        ("w4g32-sym", [], "compressed-tensors", False),
        ("w4g32", ["--format", "fake"], "fake", False),
    ],
)
def test_card_snippets_load_the_export(tiny_llama_dir, tmp_path, scheme, extra, fmt, dequantize):
    out = tmp_path / "out"
    record = quantize(tiny_llama_dir, out, "--scheme", scheme, *extra)
    assert record["format"] == fmt
    check_card_names_no_local_path(out, tiny_llama_dir, scheme)
    code = snippet(out, "transformers")
    assert ("dequantize=True" in code) == dequantize
    reference = load(out, kernel="reference").model  # bit for bit the quantized model
    with torch.no_grad():
        want = reference(torch.arange(3, 20)[None]).logits
    torch.testing.assert_close(run_snippet(code, tmp_path), want, rtol=1e-4, atol=1e-4)
    # lowbit's default runtime: packed 4-bit layers on the bf16 int4 kernel, within runtime.py's logit tolerance
    kernel_tol = 3e-2 * float(want.abs().max())
    torch.testing.assert_close(run_snippet(snippet(out, "lowbit"), tmp_path), want, rtol=0, atol=kernel_tol)


def check_card_names_no_local_path(out, model_dir, scheme: str) -> None:
    """The card names the scheme and loads `./out`, never a path of the machine that wrote it."""
    card = (out / "README.md").read_text()
    assert f"scheme `{scheme}`" in card and "`?`" not in card
    assert "./out" in card
    for path in (out.resolve(), out.parent.resolve(), model_dir):
        assert str(path) not in card
    assert str(out.parent.resolve().parent) not in card  # not even the temporary root above it


def test_card_names_the_hub_id_when_given():
    record = {
        "model": "/home/someone/models/tiny",
        "config": {"recipe": "rtn", "scheme": {"bits": 4, "group_size": -1, "act_bits": 4}},
    }
    card = model_card("fake", "/home/someone/exports/tiny-w4a4", record, hub_id="org/tiny-w4a4")
    assert "/home/someone" not in card
    assert "scheme `w4a4`" in card and "`tiny` (a local model)" in card
    assert "from_pretrained('org/tiny-w4a4')" in card and "snapshot_download('org/tiny-w4a4')" in card


def test_gptq_card_points_to_lowbit_on_cpu(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    assert quantize(tiny_llama_dir, out, "--scheme", "w4g32-sym", "--format", "gptq")["format"] == "gptq"
    check_card_names_no_local_path(out, tiny_llama_dir, "w4g32-sym")
    card = (out / "README.md").read_text()
    assert "gptqmodel" in card and "## vLLM" in card
    run_snippet(snippet(out, "lowbit"), tmp_path)


def test_auto_falls_back_and_says_why(tiny_llama_dir, tmp_path):
    """Group 48 does not divide the tiny model's 64 columns: compressed-tensors is refused, auto picks another."""
    out = tmp_path / "out"
    record = quantize(tiny_llama_dir, out, "--scheme", "w4g48")
    assert record["format"] in ("gptq", "fake")
    assert "group size 48 does not divide" in record["format_choice"]["rejected"]["compressed-tensors"]


def test_weight_activation_scheme_defaults_to_fake_with_a_warning_in_the_card(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    record = quantize(tiny_llama_dir, out, "--scheme", "w4a4")
    assert record["format"] == "fake"
    check_card_names_no_local_path(out, tiny_llama_dir, "w4a4")
    card = (out / "README.md").read_text()
    assert "lowbit.load" in card and "weight-only" in card and "## vLLM" not in card


def test_cli_prints_size_and_snippet(tiny_llama_dir, tmp_path, capsys):
    quantize(tiny_llama_dir, tmp_path / "out", "--scheme", "w4g32-sym")
    printed = capsys.readouterr().out
    assert "wrote compressed-tensors export" in printed and "float model" in printed
    assert "AutoModelForCausalLM.from_pretrained" in printed


def test_packed_export_with_stage_artifacts_reloads(tiny_llama_dir, tmp_path):
    """AWQ keeps its scales/clips in lowbit_artifacts.safetensors next to the weights: the loader must skip it."""
    out = tmp_path / "out"
    args = ["--recipe", "awq+rtn", "--opt", "awq.n_grid=2", "--opt", "awq.clip_grid=2", "--scheme", "w4g32",
            "--dataset", "builtin", "--nsamples", "2", "--seqlen", "32"]  # fmt: skip
    assert main([str(a) for a in ["quantize", tiny_llama_dir, *args, "--out", out]]) == 0
    assert (out / "lowbit_artifacts.safetensors").is_file()
    assert json.loads((out / RECORD_FILE).read_text())["format"] == "compressed-tensors"
    with torch.no_grad():
        assert torch.isfinite(load(out).model(torch.arange(3, 20)[None]).logits).all()
