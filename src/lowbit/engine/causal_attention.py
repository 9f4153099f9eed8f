"""Causal attention computed in query chunks, for block training on CPU (issue 16).

torch's CPU flash-attention kernel runs a causal forward+backward over one SignSGD batch (8 x 512 tokens, SmolLM2) at
about a seventh of the rate the block's linears reach (benchmarks/investigations/profile_signround_block.py): it is
the largest part of an iteration that is far from the hardware's rate. Here the queries are split into chunks of
`chunk` rows; chunk i attends to keys [0, end_i) only, so the masked upper triangle is mostly skipped, and every
product is one batched matmul per chunk. Grouped-query heads are folded into the rows of the query chunk, so keys and
values are never repeated. The probabilities are kept (in the operands' dtype) for the backward, which is the textbook
one: dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(P * dP)), dQ = dS K, dK = dS^T Q.

Precision as torch's flash kernel: the scores Q K^T and dP = dO V^T, whose rounding the softmax and its backward's
subtraction would amplify, are fp32 products (of the bf16 operands, under autocast); softmax and row sums are fp32;
the P V, P^T dO, dS K and dS^T Q products run in the operands' dtype. Memory: the probabilities of one block call,
B x H x L^2 / 2 values in that dtype (19 MB for a SignSGD batch of SmolLM2 at 512 tokens). Checked against SDPA in
the tests.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn


def _fold_groups(x: Tensor, groups: int) -> Tensor:
    """(B, H, L, D) -> (B, Hkv, G, L, D): the query heads that share one key/value head side by side."""
    b, h, length, d = x.shape
    return x.view(b, h // groups, groups, length, d)


def _rows(x5: Tensor, start: int, end: int) -> Tensor:
    """Rows [start, end) of every query head of a group, as one (B, Hkv, G * rows, D) matrix."""
    b, hkv, g, _, d = x5.shape
    return x5[:, :, :, start:end].reshape(b, hkv, g * (end - start), d)


def _masked_probs(q_rows: Tensor, key32: Tensor, start: int, end: int, groups: int, scale: float) -> Tensor:
    """Softmax of the chunk's scores against fp32 keys [0, end), causal inside the diagonal block; fp32."""
    scores = torch.matmul(q_rows.float(), key32[:, :, :end].transpose(-1, -2)).mul_(scale)
    rows = end - start
    future = torch.ones(rows, end, dtype=torch.bool, device=scores.device).triu_(start + 1)
    scores = scores.view(*scores.shape[:2], groups, rows, end).masked_fill_(future, float("-inf"))
    return scores.softmax(-1).view(*q_rows.shape[:3], end)


class ChunkedCausalAttention(torch.autograd.Function):
    """softmax(Q K^T * scale + causal) V for q (B, H, L, D) and k, v (B, Hkv, L, D); returns (B, H, L, D)."""

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, scale: float, chunk: int) -> Tensor:  # noqa: D102
        groups = query.shape[1] // key.shape[1]
        length = query.shape[2]
        q5, key32 = _fold_groups(query, groups), key.float()
        out = torch.empty_like(q5)
        probs = []
        for start in range(0, length, chunk):
            end = min(start + chunk, length)
            p = _masked_probs(_rows(q5, start, end), key32, start, end, groups, scale).to(query.dtype)
            o = torch.matmul(p, value[:, :, :end])
            out[:, :, :, start:end] = o.view(*o.shape[:2], groups, end - start, o.shape[-1])
            probs.append(p)
        out = out.view_as(query)
        ctx.save_for_backward(query, key, value, *probs)
        ctx.scale, ctx.chunk, ctx.groups = scale, chunk, groups
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # noqa: D102
        query, key, value, *probs = ctx.saved_tensors
        scale, chunk, groups = ctx.scale, ctx.chunk, ctx.groups
        dtype, length = query.dtype, query.shape[2]
        q5, do5 = (_fold_groups(t, groups) for t in (query, grad_out.to(dtype).contiguous()))
        value32 = value.float()
        grad_q = torch.empty_like(q5)
        grad_k = torch.zeros(key.shape, dtype=torch.float32, device=key.device)
        grad_v = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
        for index, start in enumerate(range(0, length, chunk)):
            end = min(start + chunk, length)
            p = probs[index]
            do_rows, q_rows = _rows(do5, start, end), _rows(q5, start, end)
            grad_v[:, :, :end] += torch.matmul(p.transpose(-1, -2), do_rows).float()
            dp = torch.matmul(do_rows.float(), value32[:, :, :end].transpose(-1, -2))
            p32 = p.float()
            dp -= (p32 * dp).sum(-1, keepdim=True)  # softmax backward: dP - rowsum(P * dP)
            ds = dp.mul_(p32).mul_(scale).to(dtype)
            dq = torch.matmul(ds, key[:, :, :end])
            grad_q[:, :, :, start:end] = dq.view(*dq.shape[:2], groups, end - start, dq.shape[-1])
            grad_k[:, :, :end] += torch.matmul(ds.transpose(-1, -2), q_rows).float()
        return grad_q.view_as(query), grad_k.to(dtype), grad_v.to(dtype), None, None


def chunked_causal_attention(query: Tensor, key: Tensor, value: Tensor, scale: float, chunk: int = 64) -> Tensor:
    """Causal attention of (B, H, L, D) queries over (B, Hkv, L, D) keys/values in chunks of `chunk` query rows."""
    if query.shape[1] % key.shape[1] or key.shape != value.shape or query.shape[2] != key.shape[2]:
        raise ValueError(f"chunked causal attention needs q {tuple(query.shape)} over k/v of the same length")
    device = query.device.type
    if torch.is_autocast_enabled(device):  # as SDPA under autocast: every operand in the autocast dtype
        dtype = torch.get_autocast_dtype(device)  # (RoPE leaves q, k in fp32 while v comes out of its linear in bf16)
        with torch.autocast(device, enabled=False):
            return ChunkedCausalAttention.apply(query.to(dtype), key.to(dtype), value.to(dtype), scale, chunk)
    dtype = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
    return ChunkedCausalAttention.apply(query.to(dtype), key.to(dtype), value.to(dtype), scale, chunk)


ATTENTION_NAME = "lowbit_chunked_causal"
ATTENTION_MODES = ("sdpa", "chunked")


def resolve_attention(mode: str, device: torch.device) -> str:
    """`auto` is the chunked kernel on CPU (2x faster than torch's flash kernel there: benchmarks/results/speed-log.md)
    and SDPA elsewhere (GPU flash attention is not the bottleneck; the kernel is unmeasured there)."""
    if mode == "auto":
        return "chunked" if device.type == "cpu" else "sdpa"
    return mode


def lowbit_chunked_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention-function signature: chunked causal attention where it computes exactly what SDPA
    would (no mask, no dropout, a causal prefill, no sliding window, sinks, softcap or position bias), else SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    plain = not any(kwargs.get(name) is not None for name in ("softcap", "sliding_window", "s_aux", "position_bias"))
    if (
        causal
        and plain
        and attention_mask is None
        and (dropout == 0.0 or not module.training)
        and query.shape[2] > 1
        and query.shape[2] == key.shape[2]
        and getattr(module, "sliding_window", None) is None
    ):
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        return chunked_causal_attention(query, key, value, scale).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def _register() -> None:
    """Make `lowbit_chunked_causal` a known attention implementation (idempotent; transformers imported lazily)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, lowbit_chunked_attention)


@contextlib.contextmanager
def block_attention(block: nn.Module, attention_path: str, mode: str) -> Iterator[bool]:
    """Inside the `with`, the block's attention module (`attention_path`, e.g. "self_attn") uses the chunked kernel
    when `mode` is "chunked" and it dispatches through transformers' SDPA; yields whether it was switched.

    The module gets a shallow copy of its config naming the kernel, and the original config object is put back on
    exit. A module on another implementation (eager, activation quantization, flash) is left alone."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")
    try:
        module = block.get_submodule(attention_path)
    except AttributeError:
        module = None
    config = getattr(module, "config", None)
    switch = mode == "chunked" and getattr(config, "_attn_implementation", None) == "sdpa"
    if switch:
        _register()
        patched = copy.copy(config)
        patched._attn_implementation = ATTENTION_NAME
        module.config = patched
    try:
        yield switch
    finally:
        if switch:
            module.config = config
