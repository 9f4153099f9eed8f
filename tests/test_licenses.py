"""The "licenses" dataset (Debian's license texts): deterministic, split by family, meta naming every file, a clear
error where the directory is missing, and cross-domain perplexity (`--ppl builtin,licenses`) through the CLI."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from conftest import make_tokenizer
from lowbit import data, offline_text
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.formats.files import RECORD_FILE

needs_licenses = pytest.mark.skipif(
    not offline_text.LICENSES_DIR.is_dir(), reason=f"{offline_text.LICENSES_DIR} is not installed (not Debian)"
)


@pytest.fixture
def fake_licenses(tmp_path, monkeypatch) -> Path:
    """A small license directory: versions of one family, a link to a text already read, a subdirectory."""
    root = tmp_path / "common-licenses"
    root.mkdir()
    texts = {
        "Apache-2.0": "Apache terms.",
        "BSD": "BSD terms.",
        "GPL-2": "GPL two terms.",
        "GPL-3": "GPL three terms.",
        "LGPL-2.1": "LGPL terms.",
        "MIT": "MIT terms.",
    }
    for name, text in texts.items():
        (root / name).write_text(text + "\n")
    (root / "GPL").symlink_to("GPL-3")
    (root / "notes").mkdir()
    monkeypatch.setattr(offline_text, "LICENSES_DIR", root)
    return root


def test_split_keeps_each_family_on_one_side_and_skips_duplicate_links(fake_licenses):
    calibration, evaluation, duplicates = offline_text.licenses_split()
    # families sorted: Apache, BSD, GPL, LGPL, MIT -> index 0 and 4 evaluate
    assert [item.name for item in evaluation] == ["Apache-2.0", "MIT"]
    assert [item.name for item in calibration] == ["BSD", "GPL-2", "GPL-3", "LGPL-2.1"]
    assert duplicates == {"GPL": "GPL-3"}
    assert offline_text.license_family("LGPL-2.1") == "LGPL" and offline_text.license_family("CC0-1.0") == "CC0"


def test_meta_names_every_file_with_its_sha256(fake_licenses):
    _, meta = data.calibration_documents("licenses")
    assert meta["name"] == "licenses" and meta["role"] == "calibration"
    assert meta["source"] == str(fake_licenses)
    assert meta["files"] == {
        name: hashlib.sha256((fake_licenses / name).read_bytes()).hexdigest()
        for name in ("BSD", "GPL-2", "GPL-3", "LGPL-2.1")
    }
    text, eval_meta = data.eval_text("Licenses")  # names are case-insensitive
    assert text == "Apache terms.\n\nMIT terms."
    assert list(eval_meta["files"]) == ["Apache-2.0", "MIT"] and eval_meta["duplicates_skipped"] == {"GPL": "GPL-3"}


@pytest.mark.parametrize("setup", ["missing", "one family"])
def test_missing_or_unsplittable_directory_is_a_lowbit_error(tmp_path, monkeypatch, setup):
    root = tmp_path / "common-licenses"
    if setup == "one family":
        root.mkdir()
        (root / "GPL-2").write_text("two")
        (root / "GPL-3").write_text("three")
    monkeypatch.setattr(offline_text, "LICENSES_DIR", root)
    with pytest.raises(LowbitError, match=re.escape(str(root))) as error:
        data.eval_text("licenses")
    assert "'builtin'" in str(error.value)


def test_cli_reports_the_missing_directory_in_one_line(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(offline_text, "LICENSES_DIR", tmp_path / "absent")
    assert main(["eval", str(tiny_llama_dir), "--ppl", "licenses", "--eval-seqlen", "32", "-q"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "absent" in errors[0] and "builtin" in errors[0]


@needs_licenses
def test_installed_licenses_are_deterministic_and_disjoint():
    calibration, cal_meta = data.calibration_documents("licenses")
    text, eval_meta = data.eval_text("licenses")
    assert (calibration, cal_meta) == data.calibration_documents("licenses")
    assert not set(cal_meta["files"]) & set(eval_meta["files"])
    assert not set(cal_meta["families"]) & set(eval_meta["families"])
    assert not set(cal_meta["files"].values()) & set(eval_meta["files"].values())
    assert all(doc not in text for doc in calibration)
    assert len(calibration) >= 2 and eval_meta["n_documents"] >= 1


@needs_licenses
def test_installed_licenses_token_ids_are_the_same_twice():
    tokenizer = make_tokenizer()
    first, second = data.load_eval(tokenizer, "licenses"), data.load_eval(tokenizer, "licenses")
    assert first.meta["sha256"] == second.meta["sha256"] and first.input_ids.equal(second.input_ids)
    rows = [data.load_calibration(tokenizer, "licenses", nsamples=4, seqlen=64, seed=1) for _ in range(2)]
    assert rows[0].input_ids.equal(rows[1].input_ids) and rows[0].meta["name"] == "licenses"


@needs_licenses
def test_cli_eval_reports_both_domains(tiny_llama_dir, tmp_path, capsys):
    report = tmp_path / "ppl.json"
    args = ["eval", tiny_llama_dir, "--ppl", "builtin,licenses", "--eval-windows", "2", "--eval-seqlen", "32"]
    assert main([*map(str, args), "--json", str(report), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "perplexity builtin (2 x 32 tokens)" in printed and "perplexity licenses (2 x 32 tokens)" in printed
    saved = json.loads(report.read_text())["perplexity"]
    assert list(saved) == ["builtin", "licenses"]
    assert saved["licenses"]["data"]["files"] and saved["builtin"]["ppl"] != saved["licenses"]["ppl"]


@needs_licenses
def test_quantize_eval_dataset_reports_both_domains_in_the_record(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["quantize", tiny_llama_dir, "--recipe", "rtn", "--scheme", "w4g32", "--out", out, "--format", "fake",
            "--eval", "--eval-dataset", "builtin,licenses", "--eval-windows", "2", "--eval-seqlen", "32",
            "-q"]  # fmt: skip
    assert main([*map(str, args)]) == 0
    printed = capsys.readouterr().out
    assert "perplexity builtin (2 x 32 tokens)" in printed and "perplexity licenses (2 x 32 tokens)" in printed
    evaluation = json.loads((out / RECORD_FILE).read_text())["evaluation"]
    assert list(evaluation["before"]) == list(evaluation["after"]) == ["builtin", "licenses"]
    assert evaluation["after"]["licenses"]["data"]["role"] == "eval"
