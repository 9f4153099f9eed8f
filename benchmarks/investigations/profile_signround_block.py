"""Where one SignRound block's time goes on SmolLM2 (CPU): the engine's replay of the block over the calibration in
fp32 and in bf16, and the time per SignSGD iteration with transformers' SDPA, lowbit's chunked causal attention
(`engine.attention=chunked`), the chunked kernel with the block forward compiled (`engine.compile=on`; the compile
itself is timed apart, on a first 2-iteration run) or eager attention.

Usage (the command behind benchmarks/results/speed-log.md, "SignRound light, second round"):
    flock /tmp/lowbit-bench.lock python benchmarks/investigations/profile_signround_block.py \
        --out benchmarks/results/profile_signround_block.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/common.py
from common import machine, write_json  # noqa: E402


def block_context(attn: str, nsamples: int, seqlen: int, block_index: int, scheme):
    """Block `block_index` of the embedded model with its captured float inputs (attention implementation `attn`)."""
    from lowbit.arch import arch_for
    from lowbit.data import load_calibration
    from lowbit.engine import call_block, capture_block_inputs
    from lowbit.engine.context import BlockContext
    from lowbit.models import load_model

    loaded = load_model(None)
    model = loaded.model
    if model.config._attn_implementation != attn:  # before the capture: the causal mask's form depends on it
        model.set_attn_implementation(attn)
    arch = arch_for(model)
    ids = load_calibration(loaded.tokenizer, "builtin", nsamples=nsamples, seqlen=seqlen, seed=42).input_ids
    captured = capture_block_inputs(model, arch, ids, batch_size=8, device=torch.device("cpu"))
    hidden = captured.hidden
    for index, block in enumerate(arch.blocks(model)[:block_index]):  # the float chain up to the block
        with torch.no_grad():
            hidden = torch.cat(
                [call_block(block, hidden[i : i + 8], captured.per_block[index]) for i in range(0, len(hidden), 8)]
            )
    return BlockContext(
        index=block_index, name=arch.block_name(block_index), block=arch.blocks(model)[block_index], arch=arch,
        scheme=scheme, kwargs=captured.per_block[block_index], device=torch.device("cpu"), batch_size=8, seed=42,
        inputs=hidden, fp_inputs=hidden,
    )  # fmt: skip


def attention_ms(heads: int, kv_heads: int, seqlen: int, head_dim: int, repeats: int = 5) -> dict[str, float]:
    """Forward+backward of causal attention over one SignSGD batch (8 samples) in bf16: SDPA's CPU flash kernel,
    its math backend, plain matmul + softmax (what eager attention does) and lowbit's chunked kernel."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lowbit.engine.causal_attention import chunked_causal_attention

    q = torch.randn(8, heads, seqlen, head_dim, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(8, kv_heads, seqlen, head_dim, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    mask = torch.full((seqlen, seqlen), float("-inf")).triu(1).to(torch.bfloat16)
    groups = heads // kv_heads

    def flash():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()

    def math():
        with sdpa_kernel(SDPBackend.MATH):
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()

    def matmul_softmax():
        kr, vr = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scores = (q @ kr.transpose(-1, -2)).float() * head_dim**-0.5 + mask.float()
        (scores.softmax(-1).to(torch.bfloat16) @ vr).sum().backward()

    def chunked(chunk: int):
        return lambda: chunked_causal_attention(q, k, v, head_dim**-0.5, chunk).sum().backward()

    timings = {}
    kernels = [("sdpa_flash", flash), ("sdpa_math", math), ("matmul_softmax", matmul_softmax)]
    kernels += [(f"chunked{chunk}", chunked(chunk)) for chunk in (64, 128, 256)]
    for name, fn in kernels:
        fn()
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        timings[f"{name}_fwd_bwd_ms"] = round(1000 * (time.perf_counter() - started) / repeats, 1)
    return timings


def measure_block(ctx, scheme, iters: int) -> dict:
    """The block's replay in fp32 and bf16 (the fp32 one becomes the targets), then `iters` bf16 SignSGD steps."""
    from lowbit.methods.signround.stage import SignRound, SignRoundOptions

    row = {}
    for mode in ("off", "bf16"):
        ctx.autocast = mode
        started = time.perf_counter()
        out = ctx.run(ctx.fp_inputs)
        row[f"replay_seconds_{'fp32' if mode == 'off' else mode}"] = round(time.perf_counter() - started, 3)
        if mode == "off":
            ctx.targets = out
        else:
            row["replay_bf16_relative_difference"] = round(float((out - ctx.targets).norm() / ctx.targets.norm()), 5)
    if ctx.compile:  # the first call compiles (the forward and, at the first backward, the backward)
        started = time.perf_counter()
        SignRound(SignRoundOptions(iters=2, lr=5e-3, autocast="bf16"), scheme).process_block(ctx)
        row["compile_and_2_iterations_seconds"] = round(time.perf_counter() - started, 2)
    stage = SignRound(SignRoundOptions(iters=iters, lr=5e-3, autocast="bf16"), scheme)
    started = time.perf_counter()
    stage.process_block(ctx)
    row["iteration_ms_bf16"] = round(1000 * (time.perf_counter() - started) / iters, 1)
    row["best_loss"] = ctx.metrics["best_loss"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--block", type=int, default=0)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/profile_signround_block.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lowbit.engine.causal_attention import block_attention
    from lowbit.scheme import parse_scheme

    scheme = parse_scheme("w2g128")
    rows = []
    for attn in ("sdpa", "chunked", "chunked+compile", "eager"):
        chunked = attn.startswith("chunked")
        ctx = block_context("eager" if attn == "eager" else "sdpa", args.nsamples, args.seqlen, args.block, scheme)
        ctx.compile = attn.endswith("compile")
        with block_attention(ctx.block, ctx.arch.attention, "chunked" if chunked else "sdpa"):
            row = {"attention": attn} | measure_block(ctx, scheme, args.iters)
        print(row, flush=True)
        rows.append(row)
    kernels = attention_ms(9, 3, args.seqlen, 64)  # SmolLM2: 9 query heads of 64 over 3 key/value heads
    print(kernels, flush=True)
    payload = {
        "benchmark": "profile_signround_block",
        "attention_kernels": kernels,
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "settings": vars(args) | {"out": str(args.out), "scheme": "w2g128", "batch_size": 8},
        "rows": rows,
    }
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
