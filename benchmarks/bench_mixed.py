"""Budgeted mixed precision (issue 34) on SmolLM2-135M: GPTQ and SignRound (light) with an `auto:` plan vs the
uniform scheme of the same or larger stored size; perplexity and file size side by side.

Usage (the command behind benchmarks/results/mixed.md):
    flock /tmp/lowbit-bench.lock python benchmarks/bench_mixed.py --out benchmarks/results/mixed.json \\
        --page benchmarks/results/mixed.md
    python benchmarks/bench_mixed.py --table benchmarks/results/mixed.json     # the table again, no runs
    python benchmarks/bench_mixed.py --smoke --out /tmp/mixed_smoke.json         # minutes: one budget, one method

Every row quantizes the embedded (fp32) model in its own process, one at a time, writes a compressed-tensors
export (dense packing) into a temporary directory and evaluates the result (the run's --eval, float perplexity
alongside). "stored bits" is 8 x the bytes of the block linears' tensors in those files / their weights (codes,
scales, zeros, shapes: what the budget counts; fp32 scales, as compressed-tensors stores them for an fp32 model),
"file MiB" the size of all weight files (with the float embeddings, norms and head). For each budget the uniform
rows are the cheapest option whose uniform stored bits are at least the budget (same or larger size) and, for
reference, the largest below it. The JSON is rewritten after every row.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, run_isolated, write_json  # noqa: E402

# lowbit's default set. With the fp32 embedded model the scales are stored in fp32, so w2g64 costs 2.53 bits and a
# 2.5 budget is out of reach (the default budgets start at 2.6); w2g-1 would reach it, but the smoke runs showed every
# estimator spending it on dozens of linears (per-channel 2-bit RTN breaks SmolLM2: perplexity in the millions)
OPTIONS = "w2g64,w3g64,w4g64,w8g-1"
RECIPES = {"gptq": ("gptq", {"gptq": {"act_order": True, "static_groups": True}}),
           "signround": ("signround-light", {})}  # fmt: skip
LINEAR_TENSORS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


def export_sizes(directory: Path, linears: set[str]) -> tuple[int, int]:
    """(bytes of the block linears' tensors, bytes of every weight file) of a compressed-tensors export."""
    from safetensors import safe_open

    linear_bytes = 0
    files = sorted(directory.glob("*.safetensors"))
    for path in files:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                owner, _, tensor = key.rpartition(".")
                if owner in linears and tensor in LINEAR_TENSORS:
                    t = f.get_tensor(key)
                    linear_bytes += t.numel() * t.element_size()
    return linear_bytes, sum(p.stat().st_size for p in files)


def row(method: str, scheme: str, options_text: str, settings: dict) -> dict:
    """Quantize the embedded SmolLM2 with `scheme` (uniform or auto:), export, measure the files, and take the run's
    perplexity before (float) and after."""
    import lowbit
    from lowbit.arch import arch_for
    from lowbit.models import load_model
    from lowbit.run import EvalSettings, ExportSettings

    del options_text  # part of `scheme` already; kept in the row's arguments for the record
    recipe, options = RECIPES[method]
    loaded = load_model(None)
    arch = arch_for(loaded.model)
    blocks = arch.blocks(loaded.model)
    linears = {f"{arch.block_name(i)}.{n}" for i, block in enumerate(blocks) for n in arch.linears(block)}
    weights = sum(lin.weight.numel() for block in blocks for lin in arch.linears(block).values())
    evaluate = EvalSettings("builtin", seqlen=settings["eval_seqlen"], windows=settings["eval_windows"], progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        started = time.perf_counter()
        result = lowbit.quantize_to(out, model=loaded, recipe=recipe, scheme=scheme, dataset="builtin",
                                    nsamples=settings["nsamples"], seqlen=settings["seqlen"], seed=42,
                                    options={"engine": {"progress": False}, **options},
                                    export=ExportSettings(format="compressed-tensors", ct_packing="dense",
                                                          checkpoint=False),
                                    evaluate=evaluate)  # fmt: skip
        seconds = time.perf_counter() - started
        linear_bytes, file_bytes = export_sizes(out, linears)
    after = next(iter(result.record["evaluation"]["after"].values()))
    before = next(iter(result.record["evaluation"]["before"].values()))
    plan = result.record.get("mixed_precision")
    counts: dict[str, int] = {}
    for option in (plan or {}).get("linears", {}).values():
        counts[option] = counts.get(option, 0) + 1
    return {"ppl": round(after["ppl"], 4), "float_ppl": round(before["ppl"], 4), "eval_windows": after["windows"],
            "stored_bits": round(8 * linear_bytes / weights, 4), "file_mib": round(file_bytes / 2**20, 3),
            "seconds": round(seconds, 1), "plan": counts or None,
            "planned_bits": plan["bits_per_weight"] if plan else None}  # fmt: skip


def uniform_sizes(options: str) -> dict[str, float]:
    """Stored bits per weight of each option used uniformly on SmolLM2, as compressed-tensors stores them."""
    from lowbit.arch import arch_for
    from lowbit.mixed.plan import uniform_bits
    from lowbit.models import load_model
    from lowbit.scheme import parse_scheme

    model = load_model(None).model  # fp32: compressed-tensors stores the scales in the model's dtype
    return uniform_bits(model, arch_for(model), parse_scheme(f"auto:8:{options}"), "compressed-tensors")


def jobs_for(budgets: list[float], methods: list[str], sizes: dict[str, float], options: str, estimator: str
             ) -> list[tuple[str, str, float]]:  # fmt: skip
    """(method, scheme, budget) rows: the plan, then the uniform options of the same or larger and of smaller size."""
    jobs, seen = [], set()
    for budget in budgets:
        above = [name for name, bits in sizes.items() if bits >= budget]
        below = [name for name, bits in sizes.items() if bits < budget]
        uniform = [min(above, key=sizes.get)] if above else []  # type: ignore[arg-type]
        uniform += [max(below, key=sizes.get)] if below else []  # type: ignore[arg-type]
        for method in methods:
            jobs.append((method, f"auto:{budget}:{options}:{estimator}", budget))
            for name in uniform:
                if (method, name) not in seen:
                    seen.add((method, name))
                    jobs.append((method, name, budget))
    return jobs


def _short(scheme: str) -> str:
    """auto:3.0:w2g64,... -> auto:3.0 (the options are in the page's header)."""
    return ":".join(scheme.split(":")[:2]) if scheme.startswith("auto:") else scheme


def table(payload: dict) -> str:
    header = "| budget | method | scheme | stored bits/weight | file MiB | ppl (float) | linears per option | s |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        plan = ", ".join(f"{n} {o}" for o, n in sorted((r.get("plan") or {}).items())) or "uniform"
        cells = [
            r["budget"],
            r["method"],
            _short(r["scheme"]),
            r.get("stored_bits", "-"),
            r.get("file_mib", "-"),
            f"{r['ppl']} ({r['float_ppl']})" if "ppl" in r else r.get("error"),
            plan,
            r.get("seconds", "-"),
        ]
        # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def page(payload: dict) -> str:
    settings = payload["settings"]
    return "\n".join([
        "# Budgeted mixed precision on SmolLM2-135M (issue 34)", "",
        f"`{payload['command']}` on {payload['machine']['cpu']} ({payload['machine']['cores']} cores).", "",
        f"Options {settings['options']}, {settings['estimator']} estimator, fp32 model (fp32 scales), "
        f"compressed-tensors (dense) stored bytes; calibration builtin "
        f"{settings['nsamples']} x {settings['seqlen']}, perplexity on builtin text, {settings['eval_windows']} "
        f"windows of {settings['eval_seqlen']} tokens. Uniform stored bits per option: "
        + ", ".join(f"{k} {v:.4f}" for k, v in payload["uniform_bits"].items()) + ".", "",
        table(payload), "",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="2.6,3.0,3.5", help="2.5 needs a cheaper option than w2g64 (fp32 scales)")
    parser.add_argument("--methods", default="gptq,signround")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--options", default=OPTIONS, help="the auto: options (and the uniform comparators)")
    parser.add_argument("--estimator", default="lm", help="hessian, gradient or lm (measured best: docs/methods.md)")
    parser.add_argument("--smoke", action="store_true", help="one budget (3.0), GPTQ only, 4 x 64 tokens, 1 window")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/mixed.json"))
    parser.add_argument("--page", type=Path, default=None, help="also write the Markdown page here")
    parser.add_argument("--table", type=Path, default=None, help="print the table of an existing JSON and exit")
    args = parser.parse_args()
    if args.table is not None:
        print(table(json.loads(args.table.read_text())))
        return
    if args.smoke:
        args.budgets, args.methods, args.nsamples, args.seqlen = "3.0", "gptq", 4, 64
        args.eval_seqlen, args.eval_windows = 256, 1
    logging.basicConfig(level=logging.WARNING)
    settings = {"nsamples": args.nsamples, "seqlen": args.seqlen, "eval_seqlen": args.eval_seqlen,
                "eval_windows": args.eval_windows}  # fmt: skip
    sizes = uniform_sizes(args.options)
    rows: list[dict] = []
    payload = {"benchmark": "mixed", "model": "HuggingFaceTB/SmolLM2-135M-Instruct (embedded, fp32)",
               "command": " ".join(["python", *sys.argv]), "machine": machine(), "uniform_bits": sizes,
               "settings": settings | {"options": args.options, "estimator": args.estimator,
                                        "recipes": {k: v[0] for k, v in RECIPES.items()}},
               "rows": rows}  # fmt: skip
    budgets = [float(b) for b in args.budgets.split(",")]
    for method, scheme, budget in jobs_for(budgets, args.methods.split(","), sizes, args.options, args.estimator):
        try:
            found = run_isolated(row, method, scheme, args.options, settings)
        except RuntimeError as error:
            found = {"error": str(error)[:300]}
        rows.append({"budget": budget, "method": method, "scheme": scheme, **found})
        logging.getLogger("bench_mixed").warning("%s", rows[-1])
        write_json(args.out, payload)
    print(table(payload))
    if args.page is not None:
        args.page.write_text(page(payload))


if __name__ == "__main__":
    main()
