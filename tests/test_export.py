import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import lowbit
from lowbit.errors import LowbitError
from lowbit.formats.files import RECORD_FILE
from lowbit.models import load_model


def test_fake_export_round_trips_through_transformers(tiny_llama_dir, tmp_path):
    result = lowbit.quantize(load_model(str(tiny_llama_dir)), recipe="rtn", scheme="w4g32")
    out = result.save(tmp_path / "out", format="fake")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp leftovers
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.arange(40).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, result.model(ids).logits, rtol=0, atol=0)
    for name, record in result.weights.items():
        assert torch.equal(reloaded.get_submodule(name).weight, record.dequantize())
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["config"]["recipe"] == "rtn"
    assert record["config"]["scheme"]["bits"] == 4
    assert record["config"]["seed"] == 42
    assert record["versions"]["torch"] == torch.__version__.split("+")[0] or record["versions"]["torch"]
    assert "quantize_seconds" in record["timings"]
    assert (out / "tokenizer.json").exists()


def test_existing_output_is_kept_unless_overwrite(tiny_llama_dir, tmp_path):
    result = lowbit.quantize(load_model(str(tiny_llama_dir)), recipe="rtn", scheme="w4g32")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(LowbitError, match="already exists"):
        result.save(out, format="fake")
    assert (out / "keep.txt").read_text() == "user data"
    result.save(out, format="fake", overwrite=True)
    assert not (out / "keep.txt").exists()
    assert (out / "config.json").exists()


def test_a_failed_write_leaves_no_directory(tiny_llama_dir, tmp_path, monkeypatch):
    result = lowbit.quantize(load_model(str(tiny_llama_dir)), recipe="rtn", scheme="w4g32")

    def broken(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lowbit.result.write_fake", broken)
    with pytest.raises(OSError):
        result.save(tmp_path / "out", format="fake")
    assert list(tmp_path.iterdir()) == []
