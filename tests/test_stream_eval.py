"""A streamed run's --eval (the windows ride along the block loop, eval/streamed.py) reports what a resident run's
--eval reports, and a resumed streamed run continues its evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest

import lowbit
from lowbit.run import ExportSettings
from lowbit.run_eval import EvalSettings
from test_stream_run import DATA, FAST, checkpoint, interrupt_after_block

EVAL = EvalSettings("builtin", seqlen=24, windows=5, progress=False)


def evaluation(model_dir: Path, out: Path, stream: str, recipe: str, scheme: str, offload="ram", **kw) -> dict:
    engine = {"stream": stream, "progress": False, "offload": offload}
    options = {"engine": engine, **{k: v for k, v in FAST.items() if k in recipe}}
    result = lowbit.quantize_to(out, model=str(model_dir), recipe=recipe, scheme=scheme, options=options, seed=1,
                                export=ExportSettings(**kw), evaluate=EVAL, **DATA)  # fmt: skip
    assert result.streamed == (stream == "on")
    return result.record["evaluation"]


def ppl(report: dict) -> dict:
    return {when: {name: r["ppl"] for name, r in texts.items()} for when, texts in report.items()}


@pytest.mark.parametrize(
    "family, recipe, scheme",
    [("llama", "rtn", "w4g32"), ("llama", "gptq", "w4g32"), ("gemma3", "rtn", "w4g32"), ("opt", "awq+rtn", "w4g32"),
     ("llama", "omniquant", "w4a8g32"), ("qwen3_moe", "rtn", "w4g32")],
)  # fmt: skip
def test_streamed_eval_reports_what_the_resident_eval_reports(tmp_path, tokenizer_dir, family, recipe, scheme):
    model_dir = checkpoint(tmp_path / "ckpt", tokenizer_dir, family=family)
    resident = evaluation(model_dir, tmp_path / "resident", "off", recipe, scheme)
    streamed = evaluation(model_dir, tmp_path / "streamed", "on", recipe, scheme)
    assert streamed.keys() == resident.keys() == {"before", "after"}
    for when in ("before", "after"):
        for name, expected in resident[when].items():
            got = streamed[when][name]
            assert got["windows"] == expected["windows"] == 5 and got["seqlen"] == 24
            assert got["ppl"] == expected["ppl"], (when, name, got["ppl"], expected["ppl"])
    assert ppl(streamed)["after"] != ppl(streamed)["before"]  # the quantized model is evaluated, not the float one


@pytest.mark.parametrize("recipe, offload", [("rtn", "ram"), ("gptq", "ram"), ("gptq", "disk")])
def test_a_resumed_streamed_run_continues_its_evaluation(tmp_path, tokenizer_dir, monkeypatch, recipe, offload):

    model_dir = checkpoint(tmp_path / "ckpt", tokenizer_dir)
    reference = evaluation(model_dir, tmp_path / "reference", "on", recipe, "w4g32", checkpoint=False)
    interrupt_after_block(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        evaluation(model_dir, tmp_path / "out", "on", recipe, "w4g32", offload)
    monkeypatch.undo()
    assert evaluation(model_dir, tmp_path / "out", "on", recipe, "w4g32", offload, resume=True) == reference


def test_resuming_with_other_eval_settings_is_refused(tmp_path, tokenizer_dir, monkeypatch):
    from lowbit.errors import LowbitError

    model_dir = checkpoint(tmp_path / "ckpt", tokenizer_dir)
    interrupt_after_block(monkeypatch)
    options = {"engine": {"stream": "on", "progress": False}}
    with pytest.raises(KeyboardInterrupt):  # started without --eval
        lowbit.quantize_to(tmp_path / "out", model=str(model_dir), recipe="rtn", scheme="w4g32", options=options,
                           seed=1, **DATA)  # fmt: skip
    monkeypatch.undo()
    with pytest.raises(LowbitError, match="same --eval"):
        evaluation(model_dir, tmp_path / "out", "on", "rtn", "w4g32", resume=True)


@pytest.mark.parametrize("recipe, scheme, tie", [("rtn", "gguf:q4_0", False), ("gptq", "gguf:q8_0", True)])
def test_a_gguf_runs_streamed_eval_keeps_the_float_embedding_for_before(tmp_path, tokenizer_dir, recipe, scheme, tie):
    """A GGUF scheme rounds the token embedding and output before the loop: a streamed --eval still reports the float
    model's perplexity before and the rounded model's after, as a resident run does, and writes the same tensors."""
    import gguf

    from lowbit.formats.files import GGUF_FILE

    model_dir = checkpoint(tmp_path / "ckpt", tokenizer_dir, tie=tie)
    resident = evaluation(model_dir, tmp_path / "resident", "off", recipe, scheme, format="gguf")
    streamed = evaluation(model_dir, tmp_path / "streamed", "on", recipe, scheme, format="gguf")
    assert ppl(streamed) == ppl(resident)
    files = {}
    for run in ("resident", "streamed"):
        reader = gguf.GGUFReader(tmp_path / run / GGUF_FILE)
        files[run] = [(t.name, t.tensor_type.name, t.data.tobytes()) for t in reader.tensors]
    assert files["streamed"] == files["resident"]
    types = {name: t for name, t, _ in files["streamed"]}
    assert types["token_embd.weight"] == scheme.removeprefix("gguf:").upper()  # untied: the scheme's; tied: Q8_0
    assert ("output.weight" in types) == (not tie)
