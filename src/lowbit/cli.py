"""Command line: `lowbit quantize`, `lowbit eval`, `lowbit compare`, `lowbit report`, `lowbit recipes`."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lowbit.cli_parser import build_parser
from lowbit.errors import LowbitError

if TYPE_CHECKING:
    from lowbit.distributed import Group
    from lowbit.run_eval import EvalSettings

log = logging.getLogger("lowbit")


def _eval_settings(args: argparse.Namespace, datasets: str) -> EvalSettings:
    from lowbit.run_eval import EvalSettings

    return EvalSettings(datasets, args.eval_seqlen, args.eval_windows, progress=not args.quiet)


def _quantize(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """One process, or this rank of a data-parallel run (started by torchrun, or by `--nproc` through it)."""
    from lowbit.distributed import check_devices, init_group, launched_world_size, relaunch

    world = launched_world_size()
    device = next((opt.split("=", 1)[1] for opt in reversed(args.opt) if opt.startswith("engine.device=")), "cpu")
    if world > 1 and args.nproc not in (1, world):
        raise LowbitError(f"--nproc {args.nproc}, but the launcher started {world} ranks: leave --nproc out")
    ranks = max(world, args.nproc)
    if ranks > 1 and args.out is None:
        raise LowbitError(f"a data-parallel run ({ranks} ranks) keeps each rank's log next to the export: pass --out")
    if world == 1 and args.nproc > 1:
        from lowbit.distributed.ranks import LOG_DIR
        from lowbit.engine.workdir import work_dir_for

        check_devices(args.nproc, device)
        return relaunch(argv, args.nproc, work_dir_for(args.out) / LOG_DIR)
    if world == 1:
        return _quantize_rank(args)
    from lowbit.distributed.ranks import LOG_DIR, run_rank
    from lowbit.engine.workdir import work_dir_for

    group = init_group(args.dist_timeout, device=device)
    level = logging.getLogger().level
    return run_rank(group, work_dir_for(args.out) / LOG_DIR, level, lambda: _quantize_rank(args, group))


def _quantize_rank(args: argparse.Namespace, group: Group | None = None) -> int:
    from lowbit.config import opts_to_mapping
    from lowbit.run import ExportSettings, quantize_to

    if args.quiet and not any(opt.startswith("engine.progress=") for opt in args.opt):
        args.opt = [*args.opt, "engine.progress=false"]
    export = ExportSettings(format=args.format, target=args.target, tp=args.tp, ct_packing=args.ct_packing,
                            max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                            checkpoint=not args.no_checkpoint, resume=args.resume, report=args.report)  # fmt: skip
    result = quantize_to(
        args.out,
        model=args.model,
        recipe=args.recipe,
        scheme=args.scheme,
        dataset=args.dataset,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        options=opts_to_mapping(args.opt),
        recipe_file=args.config,
        scheme_plan=args.scheme_plan,
        export=export,
        evaluate=_eval_settings(args, args.eval_dataset) if args.eval else None,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        group=group,
    )
    if group is not None and not group.is_main:
        return 0  # rank 0 reports
    config, evaluation = result.config, result.record.get("evaluation")
    if evaluation is not None:
        before, after = evaluation["before"], evaluation["after"]
        for name in after:
            print(
                f"perplexity {name} ({after[name]['windows']} x {args.eval_seqlen} tokens): "
                f"float {before[name]['ppl']:.3f} -> {config.recipe} {config.scheme.name} {after[name]['ppl']:.3f}"
            )
    timings = result.record["timings"]
    print(
        f"quantized {len(result.weights)} linears of {result.record['model']} with {config.recipe} "
        f"{config.scheme.name} in {timings['quantize_seconds']:.1f}s (peak RSS {timings['peak_rss_mb']:.0f} MiB)"
    )
    if args.out is not None:
        _print_export(args.out, result.record["format"], Path(result.record["model_path"]))
        if result.report_path is not None:
            print(f"wrote run report {result.report_path}")
    return 0


def _print_export(out: str, fmt: str, float_dir: Path) -> None:
    """Where the export went, its size next to the float model's, and how to load it (from its model card)."""
    from lowbit.export.card import transformers_snippet
    from lowbit.export.space import format_bytes
    from lowbit.formats.files import CARD_FILE, RECORD_FILE

    size = sum(p.stat().st_size for p in Path(out).glob("model*") if p.suffix in (".safetensors", ".gguf"))
    float_size = sum(p.stat().st_size for p in float_dir.iterdir() if p.suffix in (".safetensors", ".gguf"))
    print(f"wrote {fmt} export to {out}: {format_bytes(size)} of weights (float model {format_bytes(float_size)})")
    record = json.loads((Path(out) / RECORD_FILE).read_text())
    snippet = transformers_snippet(fmt, str(Path(out).resolve()), record.get("config", {}).get("scheme", {}))
    print(f"load it with transformers (more in {Path(out) / CARD_FILE}):\n{snippet}")


def _eval(args: argparse.Namespace) -> int:
    from lowbit.actquant import act_bits_of, activation_record
    from lowbit.models import load_model
    from lowbit.run_eval import evaluate_perplexity
    from lowbit.runtime.load import load, packed_method

    method = packed_method(args.model) if args.model is not None else None
    # lowbit.load also reads a fake export's run record and installs its activation quantizers (W-A schemes)
    risks = {"allow_pickle": args.allow_pickle, "trust_remote_code": args.trust_remote_code}
    loaded = load(args.model, kernel=args.kernel, **risks) if args.model is not None else load_model(None, **risks)
    if method is not None:
        print(f"loaded {method} export {args.model} on lowbit's packed CPU runtime (kernel={args.kernel})")
    activation = activation_record(act_bits_of(loaded.model))
    if activation is not None:
        print(f"activation quantization on: {activation['bits']}-bit {activation['kind']} (from the export's record)")
    progress = not args.quiet
    datasets = args.ppl if args.ppl is not None or args.tasks is not None else "auto"
    results = {}
    if datasets is not None and datasets.lower() != "none":
        results = evaluate_perplexity(loaded.model, loaded.tokenizer, _eval_settings(args, datasets))
    for name, result in results.items():
        print(f"perplexity {name} ({result['windows']} x {result['seqlen']} tokens): {result['ppl']:.3f}")
    tasks = None
    if args.tasks is not None:
        from lowbit.eval.lmeval import evaluate_tasks, format_scores

        tasks = evaluate_tasks(loaded.model, loaded.tokenizer, args.tasks, progress=progress, **_lm_eval_settings(args))
        tasks["packed_runtime"] = method
        for line in format_scores(tasks):
            print(line)
    if args.json:
        report = {"model": loaded.name, "activation": activation, "perplexity": results, "lm_eval": tasks}
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.model is not None and not args.no_record:
        from lowbit.eval.compare import merge_into_record

        updated = merge_into_record(args.model, results, tasks, args.tasks)
        if updated is not None:
            print(f"added the results to {updated}")
    return 0


def _lm_eval_settings(args: argparse.Namespace) -> dict:
    limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
    return {
        "num_fewshot": args.num_fewshot,
        "limit": limit,
        "batch_size": args.batch_size,
        "include_path": args.task_dir,
    }


def _compare(args: argparse.Namespace) -> int:
    from lowbit.eval.compare import evaluate_output, format_plans, format_table

    ppl = [] if args.ppl.lower() == "none" else [part.strip() for part in args.ppl.split(",") if part.strip()]
    tasks = [] if args.tasks is None else [part.strip() for part in args.tasks.split(",") if part.strip()]
    settings = {"ppl": ppl, "seqlen": args.eval_seqlen, "windows": args.eval_windows, "tasks": tasks,
                "lm_eval_settings": _lm_eval_settings(args), "progress": not args.quiet,
                "kernel": args.kernel}  # fmt: skip
    if tasks:
        from lowbit.eval.lmeval import task_manager

        settings["lm_eval_settings"]["manager"] = task_manager(args.task_dir, tasks)  # indexed once for all rows
    rows = []
    if args.float_model is not None:
        rows.append(evaluate_output(args.float_model or None, label="float", **settings))
    rows.extend(evaluate_output(output, **settings) for output in args.outputs)
    print(format_table(rows, markdown=args.markdown))
    plans = format_plans(rows)  # where a mixed-precision output put its bits
    if plans:
        print(f"\n{plans}")
    if args.json:
        Path(args.json).write_text(json.dumps([row.to_dict() for row in rows], indent=2))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from lowbit.config import build_config, opts_to_mapping
    from lowbit.export.shards import parse_max_shard_size
    from lowbit.models import resolve_model_path
    from lowbit.planner.plan import plan_run

    config = build_config(recipe=args.recipe, scheme=args.scheme, nsamples=args.nsamples, seqlen=args.seqlen,
                          options=opts_to_mapping(args.opt))  # fmt: skip
    source = Path(args.model) if args.model and Path(args.model).is_file() else resolve_model_path(args.model)
    sizes = {key: None if value is None else parse_max_shard_size(value)
             for key, value in (("available", args.memory), ("gpu_available", args.gpu_memory))}  # fmt: skip
    plan = plan_run(source, config, stream_option=config.engine.stream, evaluate=args.eval,
                    export_format=args.format, **sizes)  # fmt: skip
    print(plan.describe())
    if args.json:
        Path(args.json).write_text(json.dumps(plan.to_dict(), indent=2))
    return 0


def _report(args: argparse.Namespace) -> int:
    from lowbit.eval.report import report_from_dir

    print(f"wrote run report {report_from_dir(args.directory, markdown=args.markdown or None)}")
    return 0


def _recipes() -> int:
    from lowbit.config import describe_options
    from lowbit.engine import EngineOptions
    from lowbit.export import FORMATS, TARGETS
    from lowbit.methods import STAGES
    from lowbit.scheme import DEFAULT_AUTO_OPTIONS, ESTIMATORS, PRESETS

    print("Stages (a recipe is transforms joined by '+', ending in one quantizer):")
    for name, stage in STAGES.items():
        print(f"  {name:<14} {stage.kind:<10} {stage.scope}-scope  {stage.summary}")
        for option, type_name, default, help_text in describe_options(stage.Options):
            print(f"      --opt {name}.{option}={default!s:<10} ({type_name}) {help_text}")
    from lowbit.methods import RECIPE_PRESETS

    print("Named recipes (a stage with preset options; explicit flags still win):")
    for name, preset in RECIPE_PRESETS.items():
        sizes = f"nsamples={preset.nsamples} seqlen={preset.seqlen}"
        opts = " ".join(f"{preset.stage}.{key}={value}" for key, value in preset.options.items())
        print(f"  {name:<16} {sizes} {opts}  ({preset.summary})")
    print("Engine options:")
    for option, type_name, default, help_text in describe_options(EngineOptions):
        print(f"      --opt engine.{option}={default!s:<10} ({type_name}) {help_text}")
    print(
        "Schemes (also any w<bits>g<group>[-sym|-sym_full|-sym_omni], group -1 = per channel; weight-activation "
        "w<bits>a<act>[g<group>][-kind], per channel unless g is given, w8a8 = 8-bit sym weights):"
    )
    print("  " + ", ".join(PRESETS))
    print(f"  auto:<bits>[:<options>][:{'|'.join(ESTIMATORS)}]  mixed precision: each linear one of the options "
          f"(default {','.join(DEFAULT_AUTO_OPTIONS)}), at most <bits> stored bits per weight; --scheme-plan reruns "
          "a plan.yaml")  # fmt: skip
    print("Formats: " + ", ".join(FORMATS))
    print("  fake               dequantized float checkpoint (research, W-A simulations; reloads with act quant)")
    print("  compressed-tensors pack-quantized weight-only INT, 1-8 bits (vLLM, transformers + compressed-tensors);")
    print("                     int-quantized W8A8 (int8 weights, dynamic per-token int8 activations)")
    print("  gptq               GPTQ v1 (qweight/qzeros/scales/g_idx), 2/4/8 bits; no asymmetric zero of 0")
    print("Export targets (--target): " + ", ".join(TARGETS) + "; packed exports load with `lowbit eval DIR`")
    return 0


def _run_command(args: argparse.Namespace, quiet: bool, argv: Sequence[str]) -> int:
    with _silenced(quiet):
        if args.command == "quantize":
            return _quantize(args, argv)
        if args.command == "eval":
            return _eval(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "plan":
            return _plan(args)
        return _report(args)


@contextlib.contextmanager
def _silenced(quiet: bool) -> Iterator[None]:
    """--quiet: every progress bar (lowbit's, lm-eval's, transformers') writes to stderr; send them nowhere.

    Log records keep the real stderr (the handler holds it) and Python warnings are routed to logging, so
    warnings and errors still show.
    """
    if not quiet:
        yield
        return
    logging.captureWarnings(True)
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            yield
    finally:
        logging.captureWarnings(False)


def _raise_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; user errors print one line and exit with status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    level = logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)  # basicConfig keeps an earlier level (a second main() in one process)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main else None  # stop as cleanly as Ctrl-C
    try:
        if args.command in ("quantize", "eval", "compare", "report", "plan"):
            return _run_command(args, quiet, argv)
        if args.command == "archs":
            from lowbit.support import matrix_markdown

            print(matrix_markdown())
            return 0
        return _recipes()
    except LowbitError as error:
        print(f"error: {error}", file=sys.stderr)
        return getattr(error, "exit_status", 2)  # a failed rank of a data-parallel run: 1
    except KeyboardInterrupt as interrupt:
        resumable = args.command == "quantize" and getattr(args, "out", None) and not args.no_checkpoint
        hint = "; finished blocks are kept: re-run the same command with --resume to continue" if resumable else ""
        why = f" ({interrupt})" if str(interrupt) else ""  # a data-parallel rank 0 says where the logs are
        print(f"error: interrupted{why}{hint}", file=sys.stderr)
        return 130
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
