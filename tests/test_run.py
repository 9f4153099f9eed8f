"""`lowbit.quantize_to`: the library face of `lowbit quantize` fails as fast as the CLI and writes the same export."""

import pytest

import lowbit
from lowbit.errors import LowbitError
from lowbit.formats.files import RECORD_FILE
from lowbit.run import ExportSettings
from lowbit.run_eval import EvalSettings


def _forbid(monkeypatch, name: str) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError(f"{name} ran before the request was refused")

    monkeypatch.setattr(name, forbidden)


def test_a_format_the_shapes_cannot_hold_is_refused_before_calibration(tiny_llama_dir, tmp_path, monkeypatch):
    _forbid(monkeypatch, "lowbit.quantization.load_calibration")
    _forbid(monkeypatch, "lowbit.run.run_quantization")
    out = tmp_path / "out"
    with pytest.raises(LowbitError, match="group"):  # g128 does not divide the tiny model's 64-wide layers
        lowbit.quantize_to(out, model=str(tiny_llama_dir), recipe="gptq", scheme="w4g128",
                           export=ExportSettings(format="compressed-tensors"))  # fmt: skip
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no lock, no work directory left behind


def test_bad_export_settings_are_refused_before_the_model_loads(tmp_path, monkeypatch):
    _forbid(monkeypatch, "lowbit.run.load_model")
    with pytest.raises(LowbitError, match="--format"):
        lowbit.quantize_to(tmp_path / "out", export=ExportSettings(format="onnx"))
    with pytest.raises(LowbitError, match="max"):
        lowbit.quantize_to(tmp_path / "out", export=ExportSettings(max_shard_size="lots"))
    with pytest.raises(LowbitError, match="--resume"):
        lowbit.quantize_to(None, export=ExportSettings(resume=True))


def test_quantize_to_writes_the_export_with_its_evaluation(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    result = lowbit.quantize_to(out, model=str(tiny_llama_dir), recipe="rtn", scheme="w4g32",
                                evaluate=EvalSettings("builtin", seqlen=64, windows=2, progress=False))  # fmt: skip
    assert (out / RECORD_FILE).is_file() and (out / "model.safetensors").is_file()
    assert result.record["format"] == "compressed-tensors"
    evaluation = result.record["evaluation"]
    assert set(evaluation["before"]) == set(evaluation["after"]) and evaluation["after"]
    assert not (tmp_path / ".out.lowbit-work").exists()  # checkpoints removed once the export is written


def test_two_local_files_are_reported_apart(tiny_llama_dir, text_file, tmp_path):
    """Each local file's perplexity is keyed by its path as given: two files do not overwrite one 'local' entry."""
    from lowbit.models import load_model
    from lowbit.run_eval import evaluate_perplexity

    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(f"Another paragraph number {i} about nothing much." for i in range(300)))
    loaded = load_model(str(tiny_llama_dir))
    names = f"{text_file},{other}"
    results = evaluate_perplexity(loaded.model, loaded.tokenizer, EvalSettings(names, seqlen=32, windows=2,
                                                                             progress=False))  # fmt: skip
    assert list(results) == [str(text_file), str(other)]
    assert results[str(text_file)]["ppl"] != results[str(other)]["ppl"]
