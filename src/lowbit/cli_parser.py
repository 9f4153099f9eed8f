"""The argument parser of the `lowbit` command: its subcommands and their flags (kept apart from what they do)."""

from __future__ import annotations

import argparse

from lowbit.errors import LowbitError
from lowbit.eval.lmeval import BATCH_SIZE_FORMS, parse_batch_size


def _batch_size(value: str) -> int | str:
    """--batch-size as lm-eval takes it; a bad value is argparse's error (exit 2) before anything loads."""
    try:
        return parse_batch_size(value)
    except LowbitError:
        raise argparse.ArgumentTypeError(f"'{value}' is not {BATCH_SIZE_FORMS}") from None


def _add_eval_flags(parser: argparse.ArgumentParser, dataset_flag: str) -> None:
    parser.add_argument(
        dataset_flag,
        default="auto",
        help="evaluation text: auto (wikitext2 when the hub is reachable, else builtin), builtin, licenses, "
        "wikitext2, c4, ptb, or a local .txt/.jsonl/.json; comma-separate several (builtin,licenses: two domains)",
    )
    parser.add_argument("--eval-seqlen", type=int, default=2048, help="perplexity window length (default 2048)")
    parser.add_argument("--eval-windows", type=int, default=None, help="evaluate only the first N windows")


def _add_load_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pickle weights (pytorch_model.bin, *.pt): they can run code when loaded; trusted sources only",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="accept a model that needs code from its repository (auto_map); trusted sources only",
    )


def _add_kernel_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kernel",
        choices=("auto", "reference"),
        default="auto",
        help="packed exports: auto runs 4-bit (and per-channel symmetric 8-bit) layers on torch's low-bit CPU kernels "
        "(fast, not bit for bit); reference dequantizes per forward, bit for bit the fake-quant model (default auto)",
    )


def _add_task_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tasks",
        default=None,
        help="lm-eval tasks, comma-separated (needs lowbit[eval]): hub tasks such as arc_easy,piqa, or the offline "
        "lowbit_mc, lowbit_cloze, lowbit_yesno, lowbit_offline (mc + cloze) shipped with lowbit",
    )
    parser.add_argument("--limit", type=float, default=None, help="lm-eval: at most N documents per task")
    parser.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: shots (default: each task's own)")
    parser.add_argument(
        "--batch-size",
        type=_batch_size,
        default="auto",
        help="lm-eval batch size: auto (lm-eval's own detection: the largest that runs, from 64 down), auto:N "
        "(detected again N times as the requests get shorter) or an integer (default auto)",
    )
    parser.add_argument("--task-dir", default=None, help="also register the lm-eval task YAMLs in this directory")


def _add_quiet_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no info logs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description="Post-training quantization of LLMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    quant = commands.add_parser("quantize", help="quantize a model and optionally export it")
    quant.add_argument("model", nargs="?", default=None, help="HF id or local directory (default: embedded SmolLM2)")
    _add_load_flags(quant)
    quant.add_argument("--recipe", default=None, help="stages joined by '+', e.g. rtn (default rtn)")
    quant.add_argument(
        "--scheme",
        default=None,
        help="e.g. w4g128, w3g128, w2g128, w4g-1, w4g128-sym (default w4g128); for --format gguf: gguf:q4_0, q4_1, "
        "q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k, iq4_nl or a llama.cpp mix gguf:q4_k_m, q4_k_s, q5_k_m, "
        "q3_k_m, q2_k_s; mixed precision under a budget: auto:3.0 or "
        "auto:3.0:w2g64,w3g128,w4g128,w8g-1[:hessian|gradient|lm]",
    )
    quant.add_argument(
        "--scheme-plan",
        default=None,
        help="rerun the per-linear schemes of a plan.yaml an auto: run wrote (editable); it sets --scheme",
    )
    quant.add_argument(
        "--dataset", default=None, help="calibration text: auto, builtin, licenses, pile-10k, c4, wikitext2 or a file"
    )
    quant.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 128)")
    quant.add_argument("--seqlen", type=int, default=None, help="tokens per calibration window (default 512)")
    quant.add_argument("--seed", type=int, default=None, help="seed for sampling and tuning (default 42)")
    quant.add_argument("--opt", action="append", default=[], metavar="STAGE.NAME=VALUE", help="stage option")
    quant.add_argument("--config", default=None, help="recipe file (YAML or TOML); flags override it")
    quant.add_argument("--out", default=None, help="output directory (written only when complete)")
    quant.add_argument(
        "--format",
        default="auto",
        help="export format: auto (default: compressed-tensors, else gptq, else fake, the first the run validates "
        "for), compressed-tensors, gptq, fake (dequantized float weights) or gguf (llama.cpp; needs "
        "--scheme gguf:<type>)",
    )
    quant.add_argument(
        "--target",
        default="any",
        help="loader the packed export must load in: vllm-gpu, vllm-cpu, transformers, any (default any: "
        "format limits are errors, vLLM limits warnings)",
    )
    quant.add_argument("--tp", type=int, default=1, help="tensor-parallel degree to validate group sizes for")
    quant.add_argument(
        "--max-shard-size",
        default="5GB",
        help="split the export's weights into shards of at most this size at block boundaries, with an index "
        "(bytes, or 500MB / 5GB with GB = 10^9 as transformers; default 5GB)",
    )
    quant.add_argument(
        "--ct-packing",
        default=None,
        help="compressed-tensors packing of 3/5/6/7-bit weights: dense (>= 0.20) or legacy (older loaders)",
    )
    quant.add_argument(
        "--overwrite", action="store_true", help="replace an existing output directory (and discard its checkpoints)"
    )
    quant.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from its checkpoints (same command otherwise; needs --out)",
    )
    quant.add_argument(
        "--no-checkpoint",
        action="store_true",
        help="do not checkpoint finished blocks next to --out (an interrupted run then cannot resume)",
    )
    quant.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="data-parallel ranks on this machine, started through torch.distributed.run (one per GPU with "
        "engine.device=cuda; gloo on CPU): each holds 1/N of the calibration samples, the export is the same "
        "(several machines: torchrun --nnodes ... -m lowbit quantize ...)",
    )
    quant.add_argument(
        "--dist-timeout",
        type=float,
        default=600.0,
        help="seconds a data-parallel collective waits for the other ranks before the run ends (default 600)",
    )
    quant.add_argument("--eval", action="store_true", help="report perplexity before and after quantization")
    _add_eval_flags(quant, "--eval-dataset")
    quant.add_argument(
        "--report", action="store_true", help="write report.html (report.md without matplotlib) into --out"
    )
    _add_quiet_flag(quant)

    evaluate = commands.add_parser("eval", help="perplexity and lm-eval tasks of a model directory, HF id, or export")
    evaluate.add_argument("model", nargs="?", default=None, help="directory or HF id (default: embedded SmolLM2)")
    _add_load_flags(evaluate)
    _add_kernel_flag(evaluate)
    _add_eval_flags(evaluate, "--ppl")
    evaluate.set_defaults(ppl=None)  # auto unless only --tasks is asked for
    _add_task_flags(evaluate)
    evaluate.add_argument("--json", default=None, help="also write the results to this JSON file")
    evaluate.add_argument(
        "--no-record", action="store_true", help="do not merge the results into an export's lowbit_record.json"
    )
    _add_quiet_flag(evaluate)

    compare = commands.add_parser("compare", help="several outputs on the same windows and tasks, one table")
    compare.add_argument("outputs", nargs="+", help="export directories (or float model directories / HF ids)")
    compare.add_argument(
        "--float", dest="float_model", nargs="?", const="", default=None, metavar="MODEL",
        help="add the float model as a row (MODEL, or the embedded default when none is given)",
    )  # fmt: skip
    _add_eval_flags(compare, "--ppl")
    _add_task_flags(compare)
    _add_kernel_flag(compare)
    compare.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    compare.add_argument("--json", default=None, help="also write the rows to this JSON file")
    _add_quiet_flag(compare)

    report = commands.add_parser("report", help="write report.html (or report.md) of an export from its run record")
    report.add_argument("directory", help="an export written by `lowbit quantize --out`")
    report.add_argument("--markdown", action="store_true", help="write report.md even when matplotlib is installed")

    plan = commands.add_parser("plan", help="the memory plan of a run, from config.json only (nothing is loaded)")
    plan.add_argument("model", nargs="?", default=None, help="model directory, its config.json, or a hub id")
    plan.add_argument("--recipe", default=None, help="as for quantize (default rtn)")
    plan.add_argument("--scheme", default=None, help="as for quantize (default w4g128)")
    plan.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 128)")
    plan.add_argument("--seqlen", type=int, default=None, help="tokens per calibration window (default 512)")
    plan.add_argument("--opt", action="append", default=[], metavar="STAGE.NAME=VALUE", help="stage option")
    plan.add_argument("--format", default="auto", help="export format (as for quantize)")
    plan.add_argument("--eval", action="store_true", help="also plan the perplexity evaluation")
    plan.add_argument("--memory", default=None, help="RAM to plan for, e.g. 64GB (default: what is available now)")
    plan.add_argument("--gpu-memory", default=None, help="accelerator memory to plan for with engine.device=cuda")
    plan.add_argument("--json", default=None, help="also write the plan as JSON to this file")
    commands.add_parser("recipes", help="list stages, schemes, formats and every option with its default")
    commands.add_parser("archs", help="the support matrix: model family x stage x export format")
    return parser
