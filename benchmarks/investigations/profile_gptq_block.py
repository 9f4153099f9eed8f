"""Where one GPTQ block's time goes on SmolLM2 (CPU, fp32): the Hessian passes per subset (their Gram
products inside), the column solves and the quantized chain's forward: true-sequential with every pass over the
whole block (before 2026-12-02) or starting at a recorded module, in one pass, full or panelled Gram products.

Usage (the command behind benchmarks/results/speed-log.md, "GPTQ at 128 x 512: ..."):
    flock /tmp/lowbit-bench.lock python benchmarks/investigations/profile_gptq_block.py \
        --out benchmarks/results/profile_gptq_block.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # profile_signround_block, beside this file
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/common.py
from profile_signround_block import block_context  # noqa: E402

from common import machine, write_json  # noqa: E402

GPTQ_OPTS = {"act_order": True, "static_groups": True, "percdamp": 0.01}  # = bench_gptq_awq.py's


def profile(ctx, scheme, *, true_sequential: bool, shortcut: bool, chain: str, panel: int | None) -> dict:
    """Seconds of each part of GPTQ's `process_block` on `ctx`'s block and of the quantized chain; `shortcut` False
    runs every pass over the whole block; `chain` "replay" replays the block for the chain, "mlp" forbids caching
    down_proj's inputs, "auto" is GPTQ's own choice; `panel` None forms the full Gram product."""
    import lowbit.methods.gptq.solve as hessian_module
    import lowbit.methods.gptq.stage as gptq_module
    from lowbit.methods.gptq.stage import GPTQ, GPTQOptions

    seconds = {"passes": [], "gram": 0.0, "solve": 0.0, "chain": 0.0}
    real = {"collect": gptq_module.collect_hessians, "solve": gptq_module.gptq_quantize,
            "gram": hessian_module.gram_matrix, "entry": gptq_module.entry_module,
            "chain": gptq_module.residual_chain, "norm": gptq_module.residual_norm,
            "fits": gptq_module.fits_in_memory}  # fmt: skip

    def timed(fn, add):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            result = fn(*args, **kwargs)
            add(time.perf_counter() - started)
            return result

        return wrapper

    def adder(key):
        return lambda elapsed: seconds.__setitem__(key, seconds[key] + elapsed)

    gram = (lambda rows, _panel=None: rows.t() @ rows) if panel is None else real["gram"]
    gptq_module.collect_hessians = timed(real["collect"], lambda elapsed: seconds["passes"].append(round(elapsed, 3)))
    gptq_module.gptq_quantize = timed(real["solve"], adder("solve"))
    hessian_module.gram_matrix = timed(gram, adder("gram"))
    gptq_module.residual_chain = timed(real["chain"], adder("chain"))
    if not shortcut:
        gptq_module.entry_module = lambda *_: None
    if chain == "replay":
        gptq_module.residual_norm = lambda *_: None
    if chain == "mlp":
        gptq_module.fits_in_memory = lambda *_: False
    ctx.outputs = None
    try:
        options = GPTQOptions(**GPTQ_OPTS, true_sequential=true_sequential, autocast="off")
        GPTQ(options, scheme).process_block(ctx)
    finally:
        gptq_module.collect_hessians, gptq_module.gptq_quantize = real["collect"], real["solve"]
        hessian_module.gram_matrix, gptq_module.entry_module = real["gram"], real["entry"]
        gptq_module.residual_chain, gptq_module.residual_norm = real["chain"], real["norm"]
        gptq_module.fits_in_memory = real["fits"]
    if ctx.outputs is None:  # the engine's replay
        started = time.perf_counter()
        ctx.run(ctx.inputs)
        seconds["chain"] = time.perf_counter() - started
    row = {"pass_seconds": seconds["passes"], "hessian_seconds": round(sum(seconds["passes"]), 3),
           "gram_seconds": round(seconds["gram"], 3), "solve_seconds": round(seconds["solve"], 3),
           "chain": ctx.metrics["gptq_chain"], "chain_seconds": round(seconds["chain"], 3)}  # fmt: skip
    row["total_seconds"] = round(row["hessian_seconds"] + row["solve_seconds"] + row["chain_seconds"], 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--block", type=int, default=3)
    parser.add_argument("--scheme", default="w4g64")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/profile_gptq_block.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lowbit.engine.causal_attention import block_attention
    from lowbit.scheme import parse_scheme

    scheme = parse_scheme(args.scheme)
    ctx = block_context("sdpa", args.nsamples, args.seqlen, args.block, scheme)
    original = copy.deepcopy(ctx.block.state_dict())
    rows = []
    with block_attention(ctx.block, ctx.arch.attention, "chunked"):
        started = time.perf_counter()
        ctx.run(ctx.inputs)
        forward_seconds = round(time.perf_counter() - started, 3)
        variants = [  # (true_sequential, passes start at a recorded module, residual chain, Gram panel)
            (True, False, "replay", None), (True, False, "replay", 512), (True, True, "replay", 512),
            (True, True, "mlp", 512), (True, True, "auto", 512), (False, False, "replay", None),
            (False, False, "replay", 512),
        ]  # fmt: skip
        for true_sequential, shortcut, chain, panel in variants:
            ctx.block.load_state_dict(original)
            ctx.quantized.clear()
            row = {"true_sequential": true_sequential, "start_at_recorded_module": shortcut,
                   "gram": "full" if panel is None else f"panels of {panel}"}  # fmt: skip
            row |= profile(ctx, scheme, true_sequential=true_sequential, shortcut=shortcut, chain=chain, panel=panel)
            print(row, flush=True)
            rows.append(row)
    payload = {
        "benchmark": "profile_gptq_block",
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "settings": vars(args)
        | {
            "out": str(args.out),
            "gptq": GPTQ_OPTS,
            "batch_size": 8,
            "attention": "chunked",
            "hooks": "pre-hooks (every row: the last linear of a subset is not computed)",
        },
        "block_forward_seconds": forward_seconds,
        "rows": rows,
    }
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
