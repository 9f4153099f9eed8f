import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import save_model_dir
from lowbit.cli import main
from lowbit.formats.files import RECORD_FILE
from stages_for_tests import RecordingRTN


def run_cli(*args: str) -> int:
    return main([*map(str, args)])


def test_quantize_end_to_end_with_eval(tiny_llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = run_cli(
        "quantize", tiny_llama_dir, "--recipe", "rtn", "--scheme", "w3g32", "--out", out,
        "--eval", "--eval-dataset", text_file, "--eval-seqlen", "64", "--eval-windows", "3",
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "float" in printed and "rtn w3g32" in printed
    record = json.loads((out / RECORD_FILE).read_text())
    before = next(iter(record["evaluation"]["before"].values()))
    after = next(iter(record["evaluation"]["after"].values()))
    assert before["windows"] == after["windows"] == 3
    assert after["ppl"] != before["ppl"]

    assert run_cli("eval", out, "--ppl", text_file, "--eval-seqlen", "64", "--eval-windows", "3") == 0
    assert f"{after['ppl']:.3f}" in capsys.readouterr().out


def test_gguf_export_summary_counts_the_file(tiny_llama_dir, tmp_path, capsys):
    from lowbit.export.space import format_bytes
    from lowbit.formats.files import GGUF_FILE

    out = tmp_path / "out"
    assert run_cli("quantize", tiny_llama_dir, "--scheme", "gguf:q8_0", "--format", "gguf", "--out", out) == 0
    size = format_bytes((out / GGUF_FILE).stat().st_size)
    assert f"wrote gguf export to {out}: {size} of weights" in capsys.readouterr().out


def test_opt_model_and_opts_through_cli(tiny_opt_dir, tmp_path):
    out = tmp_path / "opt-out"
    assert run_cli("quantize", tiny_opt_dir, "--scheme", "w4g-1", "--opt", "engine.batch_size=2", "--out", out) == 0
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["config"]["options"]["engine"]["batch_size"] == 2
    assert record["architecture"] == "opt"


def test_recipes_lists_stages_options_schemes_and_formats(capsys):
    assert run_cli("recipes") == 0
    printed = capsys.readouterr().out
    for expected in ("rtn", "quantizer", "engine.batch_size=8", "w4g128", "w2g128", "fake"):
        assert expected in printed


def test_console_script_runs():
    done = subprocess.run([sys.executable, "-m", "lowbit", "recipes"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "Stages" in done.stdout


def assert_clean_failure(capsys, tmp_path, args, message):
    out = tmp_path / "never"
    code = run_cli(*args, "--out", out)
    err = capsys.readouterr().err
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert message in errors[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


@pytest.mark.parametrize(
    ("scheme", "message"), [("w9g128", "bits"), ("w0g128", "bits"), ("w4g0", "group"), ("w4g-2", "group")]
)
def test_bad_scheme(tiny_llama_dir, tmp_path, capsys, scheme, message):
    assert_clean_failure(capsys, tmp_path, ["quantize", tiny_llama_dir, "--scheme", scheme], message)


def test_missing_model(tmp_path, capsys):
    assert_clean_failure(capsys, tmp_path, ["quantize", tmp_path / "nothing-here"], "nothing-here")


def test_unsupported_architecture(tmp_path, capsys, tokenizer):
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320))
    path = save_model_dir(tmp_path / "gpt2", model, tokenizer)
    assert_clean_failure(capsys, tmp_path, ["quantize", path], "unsupported architecture 'gpt2'")


def test_existing_output_directory(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    assert run_cli("quantize", tiny_llama_dir, "--out", out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_calibration_data_too_short(tiny_llama_dir, text_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("lowbit.methods").methods.STAGES, RecordingRTN.name, RecordingRTN)
    args = ["quantize", tiny_llama_dir, "--recipe", RecordingRTN.name, "--dataset", text_file,
            "--nsamples", "100000", "--seqlen", "64"]  # fmt: skip
    assert_clean_failure(capsys, tmp_path, args, "nsamples")


def test_nan_in_model_outputs(tiny_llama_dir, text_file, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(broken)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    args = ["quantize", broken, "--eval", "--eval-dataset", text_file, "--eval-seqlen", "64"]
    assert_clean_failure(capsys, tmp_path, args, "NaN")
