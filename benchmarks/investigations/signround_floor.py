"""The matmul floor of a SignRound run on this CPU: how fast could SignSGD go if every non-matmul op were free?

One SignSGD iteration of a block must do, per linear, the forward product, the weight gradient (V's gradient is the
weight's, through the STE) and, where the linear's input carries a gradient, the input gradient; plus causal
attention's four products forward and backward. This script times each of those bf16 products at its real shape
(batch x seqlen tokens, 2 threads), sums them into a floor per iteration and per run (iterations x blocks, plus the
engine's two forward replays per block), and measures the real iteration (eager and, with `--compile`, compiled) and
replays on one block, so the run's time can be split into "matmul floor" and "everything else".

Usage (the command behind benchmarks/results/speed-log.md, "SignRound light: the matmul floor"):
    flock /tmp/lowbit-bench.lock python benchmarks/investigations/signround_floor.py --compile \
        --out benchmarks/results/signround_floor.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # profile_signround_block, beside this file
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/common.py
from profile_signround_block import block_context, measure_block  # noqa: E402

from common import machine, write_json  # noqa: E402


def seconds(fn, repeats: int) -> float:
    """Mean wall time of `fn` after one warm-up call."""
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def linears_needing_input_grad(ctx) -> dict[str, bool]:
    """Which of the block's linears see an input that carries a gradient when only the weights are trained (the
    first linears after the block input need no input gradient; autograd skips it)."""
    from lowbit.engine import call_block
    from lowbit.methods.common.frozen import frozen

    needs: dict[str, bool] = {}
    hooks = [
        linear.register_forward_pre_hook(lambda _m, args, name=name: needs.__setitem__(name, args[0].requires_grad))
        for name, linear in ctx.linears().items()
    ]
    try:
        with frozen(ctx.block), torch.enable_grad():  # as SignRound: only the linears' weights are trained
            for linear in ctx.linears().values():
                linear.weight.requires_grad_(True)
            call_block(ctx.block, ctx.inputs[:1], ctx.device_kwargs())  # (frozen restores every flag)
    finally:
        for hook in hooks:
            hook.remove()
    return needs


def linear_floor_ms(ctx, tokens: int, repeats: int) -> list[dict]:
    """bf16 forward, input-gradient and weight-gradient products of every linear at `tokens` rows."""
    needs = linears_needing_input_grad(ctx)
    rows = []
    for name, linear in ctx.linears().items():
        out_f, in_f = linear.weight.shape
        x = torch.randn(tokens, in_f, dtype=torch.bfloat16)
        w = torch.randn(out_f, in_f, dtype=torch.bfloat16)
        g = torch.randn(tokens, out_f, dtype=torch.bfloat16)
        fwd = seconds(lambda: F.linear(x, w), repeats)  # noqa: B023
        d_x = seconds(lambda: g @ w, repeats)  # noqa: B023
        d_w = seconds(lambda: g.t() @ x, repeats)  # noqa: B023
        flops = 2 * tokens * in_f * out_f
        rows.append(
            {
                "linear": name,
                "shape": [out_f, in_f],
                "needs_input_grad": needs[name],
                "forward_ms": round(1000 * fwd, 2),
                "input_grad_ms": round(1000 * d_x, 2),
                "weight_grad_ms": round(1000 * d_w, 2),
                "gflops_per_s": round(3 * flops / (fwd + d_x + d_w) / 1e9, 1),
                "iteration_ms": round(1000 * (fwd + d_w + (d_x if needs[name] else 0.0)), 2),
            }
        )
    return rows


def attention_floor_ms(ctx, batch: int, seqlen: int, repeats: int) -> dict:
    """Causal attention's products (scores and probabilities x values, forward; four products backward) on the
    unmasked triangle, as bf16 batched matmuls of the model's head shape."""
    attn = ctx.block.self_attn
    heads, head_dim = attn.config.num_attention_heads, attn.head_dim
    q = torch.randn(batch * heads, seqlen, head_dim, dtype=torch.bfloat16)
    k = torch.randn(batch * heads, seqlen, head_dim, dtype=torch.bfloat16)
    p = torch.randn(batch * heads, seqlen, seqlen, dtype=torch.bfloat16)
    full = seconds(lambda: (q @ k.transpose(1, 2), p @ k, p.transpose(1, 2) @ q), repeats)
    # forward: Q K^T, P V; backward: dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q -> 6 products of this size,
    # of which causality needs half; the three timed above are one forward + two backward products
    return {"heads": heads, "head_dim": head_dim, "iteration_ms": round(1000 * full * 2 * 0.5, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--iters", type=int, default=50, help="SignSGD iterations per block of the run to bound")
    parser.add_argument("--measure-iters", type=int, default=20, help="iterations timed on the real block")
    parser.add_argument("--block", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="also time the compiled iteration (engine.compile)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/signround_floor.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lowbit.engine.causal_attention import block_attention
    from lowbit.scheme import parse_scheme

    scheme = parse_scheme("w2g128")
    ctx = block_context("sdpa", args.nsamples, args.seqlen, args.block, scheme)
    tokens = args.batch_size * args.seqlen
    linears = linear_floor_ms(ctx, tokens, args.repeats)
    attention = attention_floor_ms(ctx, args.batch_size, args.seqlen, args.repeats)
    forward_ms = sum(row["forward_ms"] for row in linears)
    floor_iteration_ms = sum(row["iteration_ms"] for row in linears) + attention["iteration_ms"]
    # a replay is forward only: the linears' forward products and attention's 2 forward products of its 6
    floor_replay_s = 2 * (args.nsamples // args.batch_size) * (forward_ms + attention["iteration_ms"] / 3) / 1000
    measured = []
    for compiled in (False, True) if args.compile else (False,):
        ctx.compile = compiled
        with block_attention(ctx.block, ctx.arch.attention, "chunked"):
            row = {"compiled": compiled} | measure_block(ctx, scheme, args.measure_iters)
        print(row, flush=True)
        measured.append(row)
    blocks = ctx.block.self_attn.config.num_hidden_layers
    run = {"blocks": blocks, "iters": args.iters}
    run["floor_seconds"] = round(blocks * (args.iters * floor_iteration_ms / 1000 + floor_replay_s), 1)
    for row in measured:
        key = "compiled" if row["compiled"] else "eager"
        replays = 2 * row["replay_seconds_bf16"]  # the run's two replays per block (targets, chain) are bf16
        run[f"{key}_estimate_seconds"] = round(blocks * (args.iters * row["iteration_ms_bf16"] / 1000 + replays), 1)
    payload = {
        "benchmark": "signround_floor",
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "settings": vars(args) | {"out": str(args.out), "scheme": "w2g128", "tokens_per_batch": tokens},
        "linears": linears,
        "attention": attention,
        "floor_iteration_ms": round(floor_iteration_ms, 1),
        "floor_replay_seconds": round(floor_replay_s, 2),
        "measured": measured,
        "run": run,
    }
    print({k: payload[k] for k in ("floor_iteration_ms", "floor_replay_seconds", "run")}, flush=True)
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
