"""`lowbit compare` tables, the run report (HTML with inline charts, Markdown without matplotlib), --quiet."""

from __future__ import annotations

import json
import re

import pytest

import lowbit
from lowbit.cli import main
from lowbit.data import load_eval
from lowbit.eval import perplexity
from lowbit.eval import report as report_module
from lowbit.eval.report_data import build_sections
from lowbit.formats.files import RECORD_FILE


def run_cli(*args) -> int:
    return main([*map(str, args)])


def _ppl(directory, text_file) -> float:
    loaded = lowbit.load(directory)
    data = load_eval(loaded.tokenizer, str(text_file))
    return perplexity(loaded.model, data.input_ids, seqlen=64, max_windows=2, progress=False).ppl


def test_compare_two_exports_and_the_float_model(tiny_llama_dir, text_file, tmp_path, capsys):
    w4, w3 = tmp_path / "rtn-w4", tmp_path / "rtn-w3-ct"
    assert run_cli("quantize", tiny_llama_dir, "--scheme", "w4g32", "--format", "fake", "--out", w4, "-q") == 0
    args = ["--scheme", "w3g32", "--format", "compressed-tensors", "--ct-packing", "dense", "--out", w3, "-q"]
    assert run_cli("quantize", tiny_llama_dir, *args) == 0
    capsys.readouterr()
    table = tmp_path / "rows.json"
    flags = ["--ppl", text_file, "--eval-seqlen", "64", "--eval-windows", "2", "--tasks", "lowbit_yesno", "--limit", 6,
             "--batch-size", 2]  # fmt: skip
    assert run_cli("compare", w4, w3, "--float", tiny_llama_dir, *flags, "--markdown", "--json", table, "-q") == 0
    printed = capsys.readouterr().out.strip().splitlines()
    header = f"| output | method | scheme | format | weights MiB | ppl {text_file} | lowbit_yesno |"
    assert printed[0].startswith(header)
    assert printed[0].endswith("quantize s |")
    assert [line.split(" | ")[0] for line in printed[2:]] == ["| float", "| rtn-w4", "| rtn-w3-ct"]
    rows = json.loads(table.read_text())
    assert [(r["method"], r["scheme"], r["format"]) for r in rows] == [
        ("float", "-", "hf"), ("rtn", "w4g32", "fake"), ("rtn", "w3g32", "compressed-tensors")
    ]  # fmt: skip
    for row, directory in zip(rows, [tiny_llama_dir, w4, w3], strict=True):
        assert row["ppl"][str(text_file)] == round(_ppl(directory, text_file), 4)  # the same windows as `lowbit eval`
        assert 0 <= row["tasks"]["lowbit_yesno"] <= 1 and row["lm_eval_batch_sizes"] == [2]
    record = json.loads((w4 / RECORD_FILE).read_text())
    assert rows[1]["quantize_seconds"] == record["timings"]["quantize_seconds"]
    assert rows[0]["quantize_seconds"] is None
    assert rows[2]["size_mb"] < rows[1]["size_mb"] == rows[0]["size_mb"]  # packed 3-bit < fake fp32 = float
    assert f"{rows[2]['ppl'][str(text_file)]:.3f}" in printed[-1]

    assert run_cli("compare", w4, "--ppl", text_file, "--eval-seqlen", "64", "--eval-windows", "1", "-q") == 0
    plain = capsys.readouterr().out.splitlines()
    assert plain[0].split() == ["output", "method", "scheme", "format", "weights", "MiB", "ppl", str(text_file),
                                "quantize", "s"]  # fmt: skip
    assert plain[1].split()[:4] == ["rtn-w4", "rtn", "w4g32", "fake"]


@pytest.fixture(scope="module")
def signround_export(tmp_path_factory, tiny_llama_dir, text_file):
    """A real tiny SignRound run with --eval and --report (the record the report is built from)."""
    out = tmp_path_factory.mktemp("report") / "sr"
    args = ["--recipe", "signround", "--scheme", "w4g32", "--dataset", text_file, "--nsamples", "8", "--seqlen", "32",
            "--opt", "signround.iters=12", "--eval", "--eval-dataset", text_file, "--eval-seqlen", "64",
            "--eval-windows", "2", "--out", out, "--report", "-q"]  # fmt: skip
    assert run_cli("quantize", tiny_llama_dir, *args) == 0
    return out


def test_report_html_is_self_contained_with_charts(signround_export):
    page = (signround_export / report_module.HTML_FILE).read_text()
    record = json.loads((signround_export / RECORD_FILE).read_text())
    blocks = record["stages"]["signround"]
    assert [len(block["loss_trace"]) for block in blocks] == [12, 12]
    assert blocks[0]["loss_trace"][0] == [0, float(f"{blocks[0]['loss_first']:.6g}")]
    charts = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(charts) >= 4  # loss curves, before/after, seconds per block, run phases
    assert not re.search(r"(src|href)=['\"](?!data:)", page)  # nothing loaded from elsewhere
    for title in ("per-block training loss (loss_trace)", "Perplexity before / after", "Where the time went",
                  "Settings and versions", "loss_first -&gt; best_loss"):  # fmt: skip
        assert title in page
    after = next(iter(record["evaluation"]["after"].values()))["ppl"]
    assert f"{after:.6g}" in page


def test_report_command_and_markdown_without_matplotlib(signround_export, monkeypatch, capsys):
    (signround_export / report_module.HTML_FILE).unlink()
    assert run_cli("report", signround_export) == 0
    assert (signround_export / report_module.HTML_FILE).is_file()
    monkeypatch.setattr(report_module, "have_matplotlib", lambda: False)
    assert run_cli("report", signround_export) == 0
    text = (signround_export / report_module.MARKDOWN_FILE).read_text()
    assert "| curve | points | first | min | last |" in text and "| block 1 | 12 |" in text
    assert "pip install 'lowbit[report]'" in text
    assert "report.md" in capsys.readouterr().out
    assert run_cli("report", signround_export.parent) == 2


def test_report_sections_for_model_scope_metrics():
    """InvarExplore's log becomes an acceptance-rate chart; TEQ's loss trace a curve; GPTQ per-linear rows."""
    log = [{"step": s, "acceptance_rate": 0.5 / s, "window_acceptance_rate": 0.4, "objective": 2.0 - s / 10}
           for s in (1, 2, 3)]  # fmt: skip
    record = {
        "stages": {
            "invarexplore": {"method": "invarexplore", "steps": 3, "log": log, "time_breakdown_s": {"fold": 1.5}},
            "teq": {"inits": {"ones": {"loss_trace": [[0, 3.0], [10, 2.5]]}, "rand": {"loss_trace": [4.0, 3.0]}}},
            "gptq": [{"block": 0, "seconds": 0.2, "gptq": {"mlp.up_proj": {"loss": 0.25, "percdamp": 0.01}}}],
        },
        "timings": {"quantize_seconds": 3.0},
    }
    sections = {section.title: section for section in build_sections(record)}
    invar = sections["Stage 'invarexplore' (model scope)"]
    rates = invar.charts[0]
    assert rates.title == "invarexplore: acceptance rate" and rates.curves[0].y == [0.5, 0.25, 0.5 / 3]
    assert ["fold", 1.5] in invar.tables[1].rows
    teq = sections["Stage 'teq' (model scope)"]
    assert [(c.label, c.x) for c in teq.charts[0].curves] == [("inits.ones", [0.0, 10.0]), ("inits.rand", [0.0, 1.0])]
    gptq = sections["Stage group 'gptq' (1 blocks)"]
    assert [0, "gptq", "mlp.up_proj", "loss", 0.25] in gptq.tables[-1].rows


def test_quiet_silences_bars(tiny_llama_dir, text_file, tmp_path, capsys):
    flags = ["--eval", "--eval-dataset", text_file, "--eval-seqlen", "64", "--eval-windows", "2"]
    assert run_cli("quantize", tiny_llama_dir, *flags) == 0
    assert "blocks" in capsys.readouterr().err
    assert run_cli("quantize", tiny_llama_dir, *flags, "--quiet") == 0
    err = capsys.readouterr().err
    assert "blocks" not in err and "perplexity" not in err and "%|" not in err


def test_report_needs_out(tiny_llama_dir, capsys):
    assert run_cli("quantize", tiny_llama_dir, "--report") == 2
    assert "--report writes report.html into the export" in capsys.readouterr().err
