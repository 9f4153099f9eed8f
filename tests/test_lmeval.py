"""lm-eval adapter: every kind of lowbit output scores through lm-eval's own HFLM, identically to `--model hf`."""

from __future__ import annotations

import json
import shutil
import socket
from importlib import metadata

import pytest

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402

import lowbit  # noqa: E402
from conftest import make_llama  # noqa: E402
from lowbit.cli import main  # noqa: E402
from lowbit.cli_parser import build_parser  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.eval import lmeval  # noqa: E402
from lowbit.eval.lmeval import batch_sizes_used, evaluate_tasks, task_manager, wrap_model  # noqa: E402
from lowbit.eval.tasks import generate  # noqa: E402
from lowbit.formats.files import RECORD_FILE  # noqa: E402
from lowbit.models import load_model  # noqa: E402

TASKS = ["lowbit_mc", "lowbit_yesno"]
LIMIT = 24


def _loglikelihoods(model, tokenizer, tasks=TASKS, limit=LIMIT, batch_size=1) -> dict:
    """Per-document, per-choice loglikelihoods lm-eval computes for `model` through the adapter's HFLM."""
    raw = lm_eval.simple_evaluate(
        model=wrap_model(model, tokenizer, batch_size=batch_size),
        tasks=tasks,
        limit=limit,
        task_manager=task_manager(tasks=tasks),
        log_samples=True,
    )
    return _responses(raw)


def _responses(raw: dict) -> dict:
    return {
        task: [[list(map(float, resp[0])) for resp in sample["resps"]] for sample in samples]
        for task, samples in raw["samples"].items()
    }


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_llama_dir):
    """One RTN result of the tiny Llama saved as fake, compressed-tensors and GPTQ."""
    root = tmp_path_factory.mktemp("lmeval-exports")
    result = lowbit.quantize(load_model(str(tiny_llama_dir)), recipe="rtn", scheme="w4g32-sym")
    return {fmt: result.save(root / fmt, format=fmt) for fmt in ("fake", "compressed-tensors", "gptq")}


def test_shipped_task_data_is_what_the_generator_writes():
    makers = {
        "lowbit_mc.jsonl": (lambda rng, _i: generate._mc_item(rng), 1),
        "lowbit_yesno.jsonl": (lambda rng, i: generate._yesno_item(rng, truth=i % 2 == 0), 2),
        "lowbit_cloze.jsonl": (lambda rng, _i: generate._cloze_item(rng), 3),
    }
    for name, (maker, seed) in makers.items():
        rows = (generate.HERE / name).read_text().splitlines()
        assert len(rows) == generate.TEST_ITEMS + generate.TRAIN_ITEMS
        assert [json.dumps(row) for row in generate.build(maker, seed)] == rows
        keys = [row.get("question", row.get("context")) for row in map(json.loads, rows)]
        assert len(set(keys)) == len(keys)  # few-shot examples never repeat a test item
    cloze = [json.loads(row) for row in (generate.HERE / "lowbit_cloze.jsonl").read_text().splitlines()]
    assert all(len(set(row["choices"])) == 4 and 0 <= row["answer"] < 4 for row in cloze)
    manager = task_manager()
    assert {"lowbit_mc", "lowbit_cloze", "lowbit_yesno", "lowbit_offline"} <= set(manager.all_tasks)


def test_adapter_scores_equal_lm_eval_hf_model_on_a_fake_export(exports):
    fake = exports["fake"]
    loaded = lowbit.load(fake)
    ours = evaluate_tasks(loaded.model, loaded.tokenizer, TASKS, limit=LIMIT, batch_size=1, progress=False)
    raw = lm_eval.simple_evaluate(  # lm-eval's hf model at its default batch size, 1
        model="hf",
        model_args=f"pretrained={fake},device=cpu",
        tasks=TASKS,
        limit=LIMIT,
        task_manager=task_manager(tasks=TASKS),
        log_samples=True,
    )
    for task in TASKS:
        theirs = raw["results"][task]
        assert ours["tasks"][task]["acc"] == round(theirs["acc,none"], 6)
        assert ours["tasks"][task]["samples"] == LIMIT
    assert ours["tasks"]["lowbit_mc"]["acc_norm"] == round(raw["results"]["lowbit_mc"]["acc_norm,none"], 6)
    # stronger than equal accuracies: every choice's loglikelihood is the same number
    assert _loglikelihoods(loaded.model, loaded.tokenizer) == _responses(raw)
    assert ours["lm_eval_version"] == metadata.version("lm-eval")


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_packed_export_scores_the_same_as_its_fake_twin(exports, fmt):
    """lowbit's packed runtime rebuilds the fake-quant weight bit for bit, so the tolerance is zero."""
    fake, packed = lowbit.load(exports["fake"]), lowbit.load(exports[fmt], kernel="reference")
    assert type(packed.model.model.layers[0].mlp.up_proj).__name__ == "PackedLinear"
    assert _loglikelihoods(packed.model, packed.tokenizer) == _loglikelihoods(fake.model, fake.tokenizer)


def test_weight_activation_export_is_scored_with_its_activation_quantization(tiny_llama_dir, tmp_path):
    result = lowbit.quantize(load_model(str(tiny_llama_dir)), recipe="rtn", scheme="w4a4")
    out = result.save(tmp_path / "wa", format="fake")
    reloaded = lowbit.load(out)
    with_act = _loglikelihoods(reloaded.model, reloaded.tokenizer, ["lowbit_yesno"], 8)
    assert with_act == _loglikelihoods(result.model, result.tokenizer, ["lowbit_yesno"], 8)  # in memory: A4 on
    result.act_quant.remove()  # the weight-only twin scores differently
    assert with_act != _loglikelihoods(result.model, result.tokenizer, ["lowbit_yesno"], 8)


def test_cli_eval_tasks_json_and_record(exports, tmp_path, capsys):
    out = tmp_path / "export"
    shutil.copytree(exports["compressed-tensors"], out)
    report = tmp_path / "scores.json"
    args = ["eval", out, "--tasks", "lowbit_offline", "--limit", "6", "--num-fewshot", "2", "--batch-size", "4"]
    assert main([*map(str, args), "--json", str(report), "-q"]) == 0
    printed = capsys.readouterr()
    assert "lowbit_mc (2-shot, 6 docs): acc" in printed.out and "lowbit_cloze (2-shot, 6 docs)" in printed.out
    assert "average acc over 2 tasks" in printed.out
    assert "Running loglikelihood" not in printed.err  # --quiet
    saved = json.loads(report.read_text())["lm_eval"]
    assert saved["batch_size"] == 4 and saved["num_fewshot"] == 2 and saved["packed_runtime"] == "compressed-tensors"
    assert saved["batch_sizes_used"] == [4]
    assert saved["tasks"]["lowbit_mc"]["n_shot"] == 2
    record = json.loads((out / RECORD_FILE).read_text())
    (entry,) = record["lm_eval"].values()
    assert entry["tasks"] == saved["tasks"]
    assert json.loads(report.read_text())["perplexity"] == {}  # only --tasks asked: no perplexity


def test_cli_eval_plain_model_dir_and_unknown_task(tiny_llama_dir, text_file, capsys):
    args = ["eval", tiny_llama_dir, "--tasks", "lowbit_yesno", "--limit", "4", "--ppl", text_file, "--batch-size", "1"]
    assert main([*map(str, args), "--eval-seqlen", "64", "--eval-windows", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"perplexity {text_file} " in printed and "lowbit_yesno (0-shot, 4 docs)" in printed
    assert not (tiny_llama_dir / RECORD_FILE).exists()
    assert main(["eval", str(tiny_llama_dir), "--tasks", "no_such_task"]) == 2
    assert "unknown lm-eval task(s) no_such_task" in capsys.readouterr().err


def test_hub_task_without_hub_fails_at_once_with_the_offline_fix(tiny_llama_dir, monkeypatch, capsys):
    import datasets.config
    import huggingface_hub.constants

    from lowbit.eval import lmeval

    before = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    monkeypatch.setattr(lmeval, "hub_reachable", lambda: False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tiny_llama_dir / "no-cache")  # nothing cached
    attempts: list[object] = []

    def no_network(sock, address):  # the offline switch must stop the retries before any connection (~40 s)
        attempts.append(address)
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert main(["eval", str(tiny_llama_dir), "--tasks", "arc_easy", "--limit", "2", "-q"]) == 2
    err = capsys.readouterr().err
    assert attempts == []
    assert "hub is not reachable" in err and "--tasks lowbit_offline" in err and "Traceback" not in err
    assert before == (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)  # restored


# --- batch size --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "parsed"), [("auto", "auto"), ("AUTO:4", "auto:4"), ("8", 8)])
def test_batch_size_argument_parses(value, parsed):
    for command in (["eval"], ["compare", "out"]):
        assert build_parser().parse_args([*command, "--batch-size", value]).batch_size == parsed
    assert build_parser().parse_args(["eval"]).batch_size == "auto"  # the default


@pytest.mark.parametrize("value", ["0", "-1", "2.5", "big", "auto:", "auto:0", "auto:x"])
def test_bad_batch_size_exits_2_with_one_message(value, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--batch-size", value])
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "--batch-size" in errors[0] and "auto:N" in errors[0] and f"'{value}'" in errors[0]
    with pytest.raises(LowbitError, match="auto:N"):
        lmeval.parse_batch_size(value)


def test_wrap_model_passes_the_batch_size_to_hflm(tokenizer, monkeypatch):
    model = make_llama()
    assert wrap_model(model, tokenizer, batch_size=8).batch_size == 8
    assert wrap_model(model, tokenizer).batch_size == "auto"  # the default
    scheduled = wrap_model(model, tokenizer, batch_size="auto:4")
    assert scheduled.batch_size == "auto" and scheduled.batch_schedule == 4
    monkeypatch.setattr(lmeval, "MAX_BATCH_SIZE", 2)
    auto = wrap_model(model, tokenizer, batch_size="auto")
    auto._max_length = 16  # a cheap detection: 2 x 16 tokens
    assert auto.max_batch_size == 2 and auto._detect_batch_size() == 2
    assert batch_sizes_used(auto) == [2] and batch_sizes_used(scheduled) == []  # nothing detected yet
    assert batch_sizes_used(wrap_model(model, tokenizer, batch_size=8)) == [8]
    with pytest.raises(LowbitError, match="batch size 'eight'"):
        wrap_model(model, tokenizer, batch_size="eight")


def test_cpu_batch_cap_halves_until_the_detection_logits_fit():
    gib = 2**30
    assert lmeval.cpu_batch_cap(512, 49_152, 64 * gib) == 64  # 64 x 512 x 49k x 12 B = 19 GB < 32 GiB
    assert lmeval.cpu_batch_cap(2048, 49_152, 16 * gib) == 4  # 1.2 GB per row: 8 would need 9.7 GB of 8 GiB
    assert lmeval.cpu_batch_cap(2048, 49_152, 16 * gib) * 3 * 2048 * 49_152 * 4 <= 8 * gib
    assert lmeval.cpu_batch_cap(8192, 262_144, 4 * gib) == 1  # never below 1
    assert lmeval.cpu_batch_cap(16, 100, gib, start=4) == 4  # never above the start


def test_auto_detection_on_cpu_starts_where_the_logits_fit(tokenizer, monkeypatch):
    """With little memory left, "auto" does not try a batch whose logits cannot fit (it would be killed)."""
    monkeypatch.setattr(lmeval, "MAX_BATCH_SIZE", 8)
    lm = wrap_model(make_llama(), tokenizer, batch_size="auto")
    lm._max_length = 16
    vocab = lm.model.config.vocab_size
    monkeypatch.setattr(lmeval, "available_memory", lambda: 2 * 3 * 2 * 16 * vocab * 4)  # room for batch 2
    assert lm._detect_batch_size() == 2 and batch_sizes_used(lm) == [2]


def test_auto_batch_size_scores_equal_lm_eval_hf_model_with_auto(exports, monkeypatch):
    """At the same automatic batch size, every loglikelihood is lm-eval's own (the cap is small to keep it quick)."""
    monkeypatch.setattr(lmeval, "MAX_BATCH_SIZE", 4)
    fake, tasks = exports["fake"], ["lowbit_yesno"]
    loaded = lowbit.load(fake)
    lm = wrap_model(loaded.model, loaded.tokenizer, batch_size="auto")
    settings = {"tasks": tasks, "limit": 4, "task_manager": task_manager(tasks=tasks), "log_samples": True}
    ours = lm_eval.simple_evaluate(model=lm, **settings)
    theirs = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={fake},device=cpu,max_batch_size=4", batch_size="auto", **settings
    )
    assert batch_sizes_used(lm) == [4]
    assert _responses(ours) == _responses(theirs)


def test_cli_eval_records_the_automatic_batch_size(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lmeval, "MAX_BATCH_SIZE", 4)
    report = tmp_path / "scores.json"
    args = ["eval", str(tiny_llama_dir), "--tasks", "lowbit_yesno", "--limit", "4", "--json", str(report), "-q"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "lm-eval batch size auto: ran with 4" in printed and "Determined" not in printed  # lm-eval's prints logged
    saved = json.loads(report.read_text())["lm_eval"]
    assert saved["batch_size"] == "auto" and saved["batch_sizes_used"] == [4]
