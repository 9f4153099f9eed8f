"""InvarExplore, train vs test (issue 31): does the search help text it never saw, and which option keeps it from
hurting? SmolLM2-135M (the embedded default), calibration `builtin` 32 x 512 per seed, AWQ teacher per seed.

Usage (one scheme, 3 seeds, the default 12 steps: estimated 47 minutes on the 2-core CPU with no other job, of which
~39 are fixed (AWQ teachers ~15, process starts and test-curve points ~24) and ~1 per step of the 5 search rows x 3
seeds; the script logs its estimate for the given arguments, see ESTIMATE):
    flock /tmp/lowbit-bench.lock python benchmarks/bench_invarexplore_heldout.py --schemes w2g128 \
        --out benchmarks/results/invarexplore_heldout_w2.json
    python benchmarks/bench_invarexplore_heldout.py --table benchmarks/results/invarexplore_heldout_w2.json

Rows per (scheme, seed), each in its own process, all starting from the same AWQ teacher (AWQ runs once per scheme and
seed in its own process and is cached under --cache; `invarexplore+rtn` on the AWQ teacher is exactly
`awq+invarexplore+rtn` on the same calibration windows):
- `AWQ+RTN`: the base (equal to step 0 of every search row's test curve: the in-loop quantizer is the final RTN);
- `IE SxL`: AWQ+InvarExplore+RTN with the options' defaults (α 0.1, 10 monitored layers, σ's of the reference) on a
  search batch of the first S calibration windows cropped to L tokens (default 8 x 256: ~2.5 s/step here);
- `IE SxL holdout`: the same batch, plus the next S windows held out; the state best on them is returned;
- `IE SxL alpha=0` and `IE SxL alpha=1`: CE only, and MSE ten times more weight (the CE/MSE balance);
- `IE 32xL`: all 32 calibration windows in the search batch (4x the tokens).
Every search row records its train curve (objective, CE) and test curve (held-out perplexity of the current
quantized model on `builtin`'s evaluation split, same domain, and `licenses`, another domain: the first
--eval-windows windows of --eval-seqlen tokens each) at step 0, every --heldout-every steps and at the end. The
row's held-out perplexity is the test curve's last point, i.e. the returned model (for the holdout row, the
selected state). A fixed step budget (--steps), never seconds: the results do not depend on machine load.

The JSON is rewritten after every row; a rerun skips rows (and AWQ teachers) already done, so the grid can be stopped
and continued. `--table FILE...` prints the mean and min-max spread over seeds, and the curves averaged over seeds.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, run_isolated, write_json  # noqa: E402

DOMAINS = ("builtin", "licenses")  # in-domain (held-out documents), cross-domain
NSAMPLES, SEQLEN = 32, 512  # the calibration set: the 32 x 512 tokens
# ESTIMATE, seconds on the 2-core CPU (benchmarks/results/invarexplore.md, issue 13): a search step costs ~2.5 s per
# 2,048 batch tokens; AWQ took 184 s at 16 x 256 and replays 8 whole windows, so ~300 s at 32 x 512; a process
# (start, model, teacher, data, prepare) ~20 s; a test-curve point (2 domains x 4 x 512 tokens, full passes) ~8 s.
STEP_S_PER_TOKEN, AWQ_S, PROCESS_S, POINT_S = 2.5 / 2048, 300.0, 20.0, 8.0


def rows_for(args: argparse.Namespace) -> list[tuple[str, dict | None]]:
    """(label, invarexplore options) per row; None options: the AWQ+RTN base."""
    s, length = args.search_samples, args.search_seqlen
    batch = {"samples": s, "seqlen": length}
    name = f"IE {s}x{length}"
    rows: list[tuple[str, dict | None]] = [
        ("AWQ+RTN", None),
        (name, batch),
        (f"{name} holdout", batch | {"holdout": s, "holdout_every": args.holdout_every}),
        (f"{name} alpha=0", batch | {"alpha": 0.0}),
        (f"{name} alpha=1", batch | {"alpha": 1.0}),
        (f"IE {NSAMPLES}x{length}", {"samples": NSAMPLES, "seqlen": length}),
    ]
    wanted = set(args.rows.split(",")) if args.rows else None
    return [(label, options) for label, options in rows if wanted is None or label in wanted]


def estimate_seconds(args: argparse.Namespace) -> float:
    """What the grid should take on this machine with no other job (see ESTIMATE)."""
    points = args.steps // args.heldout_every + 2
    total = 0.0
    for _label, options in rows_for(args):
        if options is None:
            total += PROCESS_S + POINT_S
            continue
        tokens = options["samples"] * options["seqlen"]
        check = options.get("holdout", 0) * options["seqlen"] * STEP_S_PER_TOKEN * 2  # a full pass ~ 2 steps' tail
        total += PROCESS_S + points * POINT_S + args.steps * tokens * STEP_S_PER_TOKEN
        total += (args.steps // (args.holdout_every or args.heldout_every) + 2) * check
    return (total + AWQ_S) * len(args.seeds.split(",")) * len(args.schemes.split(","))


def awq_teacher(path: str, scheme: str, seed: int, threads: int, calibration: str = "builtin") -> dict:
    """AWQ on the seed's windows of `calibration`; the transformed float weights go to `path` (one process)."""
    from safetensors.torch import save_model

    from lowbit.arch import arch_for, window_bos_id
    from lowbit.data import load_calibration
    from lowbit.engine import EngineOptions
    from lowbit.engine.pipeline import run_stages
    from lowbit.methods.awq.stage import AWQ, AWQOptions
    from lowbit.models import load_model
    from lowbit.scheme import parse_scheme

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    loaded = load_model(None)
    model = loaded.model
    calib = load_calibration(loaded.tokenizer, calibration, nsamples=NSAMPLES, seqlen=SEQLEN, seed=seed,
                             bos_id=window_bos_id(model)).input_ids  # fmt: skip
    started = time.perf_counter()
    stage = AWQ(AWQOptions(), parse_scheme(scheme))
    run_stages(model, arch_for(model), [stage], parse_scheme(scheme), calib, EngineOptions(progress=False), seed)
    seconds = round(time.perf_counter() - started, 1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_model(model, path)  # tied embeddings stored once
    return {"awq_seconds": seconds}


def run_row(teacher: str, scheme: str, seed: int, options: dict | None, args: dict) -> dict:
    """One row on the cached AWQ teacher: the base (RTN) or a search with its train and test curves."""
    from safetensors.torch import load_model as load_weights

    import lowbit
    from lowbit.data import load_eval
    from lowbit.eval import perplexity
    from lowbit.models import load_model

    torch.set_num_threads(args["threads"])
    logging.basicConfig(level=logging.WARNING)
    loaded = load_model(None)
    load_weights(loaded.model, teacher, strict=True)
    common = {"scheme": scheme, "dataset": args["calibration"], "nsamples": NSAMPLES, "seqlen": SEQLEN, "seed": seed}
    if options is None:
        result = lowbit.quantize(loaded, recipe="rtn", options={"engine": {"progress": False}}, **common)
        row: dict[str, Any] = {}
        for domain in DOMAINS:
            ids = load_eval(loaded.tokenizer, domain).input_ids
            found = perplexity(result.model, ids, seqlen=args["eval_seqlen"], max_windows=args["eval_windows"],
                               progress=False)  # fmt: skip
            row[f"ppl_{domain}"] = round(found.ppl, 4)
        return row
    stage = {
        "max_steps": args["steps"], "progress": False, "log_every": args["heldout_every"],
        "heldout_eval": ",".join(DOMAINS), "heldout_every": args["heldout_every"],
        "heldout_windows": args["eval_windows"], "heldout_seqlen": args["eval_seqlen"],
    } | options  # fmt: skip
    result = lowbit.quantize(
        loaded, recipe="invarexplore+rtn", options={"engine": {"progress": False}, "invarexplore": stage}, **common
    )
    metrics = result.record["stages"]["invarexplore"]
    last = metrics["test_curve"][-1]
    row = {f"ppl_{domain}": last[f"{domain}_ppl"] for domain in DOMAINS}
    keep = ("steps", "accepts", "acceptance_rate", "initial_objective", "final_objective", "ce0", "final_ce",
            "seconds", "steps_per_s", "stop_reason", "fold_check", "windows", "log", "test_curve",
            "holdout")  # fmt: skip
    row["invarexplore"] = {key: metrics[key] for key in keep if key in metrics}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemes", default="w2g128", help="comma-separated, e.g. w2g128,w3g128")
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--steps", type=int, default=12, help="search steps per row (fixed: load cannot change it)")
    parser.add_argument("--heldout-every", type=int, help="steps between test-curve points (default steps/4)")
    parser.add_argument("--holdout-every", type=int, help="steps between holdout checks (default: heldout-every)")
    parser.add_argument("--search-samples", type=int, default=8, help="search batch windows (holdout: as many more)")
    parser.add_argument("--search-seqlen", type=int, default=256, help="search batch window length")
    parser.add_argument("--eval-windows", type=int, default=4, help="test-curve windows per domain")
    parser.add_argument("--eval-seqlen", type=int, default=512, help="test-curve window length")
    parser.add_argument("--calibration", choices=DOMAINS, default="builtin", help="calibration text (default builtin)")
    parser.add_argument("--rows", default="", help="comma-separated row labels to run (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/lowbit-bench-invar-heldout"), help="AWQ teachers")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--table", type=Path, nargs="+", help="print the summary tables of these JSON files")
    args = parser.parse_args()
    if args.table:
        rows = [row for path in args.table for row in json.loads(path.read_text())["rows"]]
        print(table(rows, _calibrated_on(args.table)) + "\n\n" + curves(rows))
        return
    if args.out is None:
        parser.error("--out is required")
    args.heldout_every = args.heldout_every or max(1, args.steps // 4)
    args.holdout_every = args.holdout_every or args.heldout_every
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.info("estimated %.0f minutes on the 2-core CPU with no other job", estimate_seconds(args) / 60)
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    rows: list[dict] = previous.get("rows", [])
    teachers: dict[str, dict] = previous.get("awq", {})
    done = {row["key"] for row in rows}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"table": None}
    payload = {
        "benchmark": "invarexplore_heldout",
        "model": "smollm2 (embedded default)",
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "settings": settings | {"domains": list(DOMAINS), "calibration": f"{args.calibration} {NSAMPLES} x {SEQLEN}"},
        "awq": teachers,
        "rows": rows,
    }
    for seed in [int(s) for s in args.seeds.split(",")]:  # every row at one seed before the next
        for scheme in args.schemes.split(","):
            todo = [(label, o) for label, o in rows_for(args) if f"{scheme}|{label}|{seed}" not in done]
            if not todo:
                continue
            named = "" if args.calibration == "builtin" else f"_{args.calibration}"  # builtin keeps its old names
            teacher = args.cache / f"awq_{scheme}_{seed}{named}.safetensors"
            if not teacher.exists():
                teachers[f"{scheme}|{seed}"] = run_isolated(
                    awq_teacher, str(teacher), scheme, seed, args.threads, args.calibration
                )
            for label, options in todo:
                measured = run_isolated(run_row, str(teacher), scheme, seed, options, vars(args))
                row = {"key": f"{scheme}|{label}|{seed}", "scheme": scheme, "label": label, "seed": seed,
                       "options": options, **measured}  # fmt: skip
                print(json.dumps({k: v for k, v in row.items() if k not in ("options", "invarexplore")}), flush=True)
                rows.append(row)
                done.add(row["key"])
                write_json(args.out, payload)
    print(table(rows, args.calibration) + "\n\n" + curves(rows))


def _calibrated_on(paths: list[Path]) -> str:
    """The calibration text of result files (older files, without the setting, calibrated on builtin)."""
    found = {json.loads(path.read_text())["settings"].get("calibration", "builtin").split()[0] for path in paths}
    if len(found) > 1:
        raise SystemExit(f"error: these files calibrated on different texts ({sorted(found)}): table them apart")
    return found.pop()


def _spread(values: list[float], fmt: str = ",.2f") -> str:
    """'mean (min-max)' over seeds, the value alone for one."""
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ({min(values):{fmt}} to {max(values):{fmt}})"


def _grouped(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    grouped: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        grouped.setdefault((row["scheme"], row["label"]), []).append(row)
    return grouped


def table(rows: list[dict], calibration: str = "builtin") -> str:
    """Held-out perplexity per domain, its change against AWQ+RTN of the same seed (paired: the seed also draws the
    calibration windows) and the train objective at the end: mean (min to max) over seeds, markdown."""
    base = {(r["scheme"], r["seed"]): r for r in rows if r["label"] == "AWQ+RTN"}
    domain = {d: "in-domain" if d == calibration else "cross-domain" for d in DOMAINS}
    lines = [
        f"| scheme | row | seeds | objective end | ppl builtin ({domain['builtin']}) | vs AWQ+RTN | "
        f"ppl licenses ({domain['licenses']}) | vs AWQ+RTN | steps (selected) | search s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (scheme, label), members in _grouped(rows).items():
        ie = [m.get("invarexplore") for m in members]
        objective = _spread([x["final_objective"] for x in ie], ".4f") if all(ie) else "-"
        steps = "-"
        if all(ie):
            selected = [x.get("holdout", {}).get("best_step") for x in ie]
            steps = str(ie[0]["steps"]) + (f" ({','.join(map(str, selected))})" if selected[0] is not None else "")
        seconds = f"{statistics.mean(x['seconds'] for x in ie):.0f}" if all(ie) else "-"
        cells = []
        for d in DOMAINS:
            cells.append(_spread([m[f"ppl_{d}"] for m in members]))
            paired = [
                m[f"ppl_{d}"] / base[scheme, m["seed"]][f"ppl_{d}"] - 1 for m in members if (scheme, m["seed"]) in base
            ]
            cells.append(_spread([100 * x for x in paired], "+.1f") + " %" if paired else "-")
        seeds = ",".join(str(m["seed"]) for m in members)
        lines.append(f"| {scheme} | {label} | {seeds} | {objective} | {' | '.join(cells)} | {steps} | {seconds} |")
    return "\n".join(lines)


def curves(rows: list[dict]) -> str:
    """Train vs test over the steps (mean over seeds): objective, then ppl on each domain, per search row."""
    lines = ["| scheme | row | step | objective | CE | ppl builtin | ppl licenses |", "|---|---|---|---|---|---|---|"]
    for (scheme, label), members in _grouped(rows).items():
        if not all(m.get("invarexplore") for m in members):
            continue
        by_step: dict[str, list[dict]] = {}
        for member in members:
            for point in member["invarexplore"]["test_curve"]:
                step = (
                    f"{point['step']} (selected {point['selected_step']})"
                    if "selected_step" in point
                    else str(point["step"])
                )
                by_step.setdefault(step, []).append(point)
        for step, points in by_step.items():
            mean = {key: statistics.mean(p[key] for p in points) for key in ("objective", "ce")}
            ppl = [_spread([p[f"{d}_ppl"] for p in points]) for d in DOMAINS]
            lines.append(
                f"| {scheme} | {label} | {step} | {mean['objective']:.4f} | {mean['ce']:.3f} | {ppl[0]} | {ppl[1]} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
