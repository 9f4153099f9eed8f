"""OmniQuant (issue 11) and LSI/DESV (issue 12) on SmolLM2-135M, CPU-sized; one process per row.

Usage (the commands behind benchmarks/RESULTS.md):
    for G in weight wa desv; do
      flock /tmp/lowbit-bench.lock python benchmarks/bench_omniquant.py --group $G \
        --out benchmarks/results/omniquant_$G.json
    done
    python benchmarks/bench_omniquant.py --profile   # one block's profile (top ops), printed

Every row uses the same calibration windows (builtin split, seed 42, NSAMPLES x SEQLEN) and the same evaluation
windows (builtin eval split, 4 x 2048 tokens); W-A rows are evaluated with their activation quantization on.
OmniQuant/DESV rows train under bf16 autocast (the reference tunes under fp16 AMP; `--opt omniquant.autocast=off`
is fp32, measured in the `wa` group). DESV rows warm-start from the OmniQuant row's saved LET/LWC state (the
`desv` group needs the other two groups' state directories, kept under --state).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, quantize_builtin, run_isolated, write_json  # noqa: E402

SETTINGS = {"nsamples": 16, "seqlen": 256, "seed": 42, "eval_windows": 4, "eval_seqlen": 2048, "epochs": 2}
BF16 = {"autocast": "bf16"}
# The CPU preset's LWC settings, chosen by the `cpu` group (W3g-1: ppl 331 -> 49 at this budget; not the reference)
CPU = {"lwc_init": "mse", "lwc_lr": 5e-2}


def _oq(extra: dict | None = None) -> dict:
    return {"epochs": SETTINGS["epochs"], **BF16, **(extra or {})}


def rows_for(group: str, state: Path) -> list[tuple[str, str, str, dict, str | None]]:
    """(label, recipe, scheme, options, state dir to save OmniQuant's state into)."""
    rows = []
    if group == "weight":
        for scheme in ("w2g128", "w3g-1", "w4g128"):
            rows += [
                ("RTN", "rtn", scheme, {}, None),
                ("OmniQuant LWC", "omniquant", scheme, {"omniquant": _oq({"let": False})}, None),
                ("OmniQuant LWC+LET", "omniquant", scheme, {"omniquant": _oq({"let": True})}, None),
                ("GPTQ", "gptq", scheme, {}, None),
                ("SignRound", "signround", scheme, {"signround": {"iters": 20, "batch_size": 4}}, None),
            ]
    elif group == "cpu":  # short-budget variants of LWC (not the reference): higher lr, searched start
        for scheme in ("w3g-1", "w2g128"):
            for label, extra in (
                ("LWC lr x5", {"lwc_lr": 5e-2}),
                ("LWC mse-init", {"lwc_init": "mse"}),
                ("LWC mse-init lr x5", {"lwc_init": "mse", "lwc_lr": 5e-2}),
            ):
                rows.append((label, "omniquant", scheme, {"omniquant": _oq({"let": False, **extra})}, None))
        for scheme in ("w2g128", "w4g128"):
            rows.append(("LWC mse-init lr x5", "omniquant", scheme, {"omniquant": _oq({"let": False, **CPU})}, None))
            rows.append(("LWC+LET mse-init lr x5", "omniquant", scheme, {"omniquant": _oq({"let": True, **CPU})}, None))
    elif group == "wa":
        rows += [
            ("RTN", "rtn", "w4a4", {}, None),
            ("OmniQuant LWC+LET (reference lr)", "omniquant", "w4a4", {"omniquant": _oq({"let": True})}, None),
            ("OmniQuant LWC", "omniquant", "w4a4", {"omniquant": _oq({"let": False, **CPU})}, None),
            ("OmniQuant LWC+LET", "omniquant", "w4a4", {"omniquant": _oq({"let": True, **CPU})}, state / "oq-w4a4"),
            (
                "OmniQuant LWC+LET fp32",
                "omniquant",
                "w4a4",
                {"omniquant": _oq({"let": True, **CPU, "autocast": "off"})},
                None,
            ),
            ("RTN", "rtn", "w6a6", {}, None),
            ("OmniQuant LWC+LET", "omniquant", "w6a6", {"omniquant": _oq({"let": True, **CPU})}, None),
        ]
    elif group == "desv":
        rows.append(
            ("OmniQuant LWC", "omniquant", "w2g128", {"omniquant": _oq({"let": False, **CPU})}, state / "oq-w2g128")
        )
        for scheme, base, bands in (("w2g128", {"let": False}, (0, 100, 50, 25)), ("w4a4", {"let": True}, (0, 100))):
            warm = str(state / f"oq-{scheme}")
            base = {**base, **CPU}
            rows.append(
                (
                    "OmniQuant +2 epochs (control)",
                    "omniquant",
                    scheme,
                    {"omniquant": _oq({**base, "warm_start": warm})},
                    None,
                )
            )
            for n in bands:
                label = "LSI" if n == 0 else f"DESV n={n}"
                rows.append((label, "desv", scheme, {"desv": _oq({**base, "n": n, "warm_start": warm})}, None))
    return rows


def run_row(label: str, recipe: str, scheme: str, options: dict, save_state: str | None) -> dict:
    import torch

    from lowbit.export import write_artifacts
    from lowbit.models import load_model

    torch.manual_seed(0)
    loaded = load_model(None)
    result, seconds = quantize_builtin(loaded, recipe, scheme, SETTINGS, options)
    if save_state:
        Path(save_state).mkdir(parents=True, exist_ok=True)
        write_artifacts(Path(save_state), result.artifacts)
    started = time.perf_counter()
    ppl = result.perplexity("builtin", seqlen=SETTINGS["eval_seqlen"], max_windows=SETTINGS["eval_windows"])
    stage = result.record["stages"].get(recipe.split("+")[-1], [])
    per_block = [block.get("seconds", 0.0) for block in stage]
    detail = [block.get(recipe, {}) for block in stage]
    return {
        "label": label,
        "recipe": recipe,
        "scheme": scheme,
        "options": options,
        "ppl": round(ppl.ppl, 4),
        "quantize_seconds": seconds,
        "eval_seconds": round(time.perf_counter() - started, 1),
        "block_seconds_mean": round(sum(per_block) / max(len(per_block), 1), 3),
        "activation": result.record.get("activation"),
        "detail_block0": detail[0] if detail else None,
        "final_losses": [d.get("epoch_losses", d.get("desv", {}).get("epoch_losses")) for d in detail][::5],
    }


def profile_block() -> None:
    """Profile OmniQuant LWC+LET steps on one SmolLM2 block (W4A4, bf16 and fp32): which ops dominate."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from lowbit.arch import arch_for
    from lowbit.data import load_calibration
    from lowbit.engine import BlockContext, capture_block_inputs
    from lowbit.methods.omniquant.stage import OmniQuant, OmniQuantOptions
    from lowbit.models import load_model
    from lowbit.scheme import parse_scheme

    loaded = load_model(None)
    arch = arch_for(loaded.model)
    ids = load_calibration(loaded.tokenizer, "builtin", nsamples=8, seqlen=256, seed=42).input_ids
    captured = capture_block_inputs(loaded.model, arch, ids, batch_size=8, device=torch.device("cpu"))
    scheme = parse_scheme("w4a4")
    for autocast in ("bf16", "off"):
        block = arch.blocks(loaded.model)[3]
        kwargs = captured.kwargs_for(3)
        ctx = BlockContext(3, arch.block_name(3), block, arch, scheme, kwargs, torch.device("cpu"), 8, 42)
        ctx.inputs = ctx.fp_inputs = captured.hidden
        ctx.targets = ctx.run(captured.hidden)
        stage = OmniQuant(OmniQuantOptions(epochs=1, let=True, autocast=autocast), scheme)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            stage.process_block(ctx)
        print(f"== autocast {autocast}: {ctx.metrics['omniquant']['step_ms']} ms/step")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group", choices=["weight", "cpu", "wa", "desv"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--state", type=Path, default=Path("/tmp/lowbit-bench-omniquant-state"))
    parser.add_argument("--only", default=None, help="run only rows whose scheme contains this text")
    parser.add_argument("--start", type=int, default=0, help="skip the group's first rows (resume a partial run)")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.profile:
        profile_block()
        return
    rows = []
    for label, recipe, scheme, options, save in rows_for(args.group, args.state)[args.start :]:
        if args.only and args.only not in scheme:
            continue
        row = run_isolated(run_row, label, recipe, scheme, options, str(save) if save else None)
        rows.append(row)
        print(
            f"| {scheme} | {label} | {row['ppl']:.4g} | {row['quantize_seconds']:.0f} | "
            f"{row['block_seconds_mean']:.2f} | {row['peak_rss_mb']:.0f} |",
            flush=True,
        )
        write_json(args.out, {"machine": machine(), "settings": SETTINGS, "group": args.group, "rows": rows})


if __name__ == "__main__":
    main()
