"""The invariants a QuantizedWeight holds before any export packs it: layout and dtypes, codes and zeros inside the
grid, finite non-zero scales, the constant zero of a symmetric scheme, and every group used exactly g times.

Kept apart from the quantizer's math so that `quantizer.py` stays the arithmetic; the record calls
`record_problems` from its `validate`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lowbit.scheme import QuantScheme

if TYPE_CHECKING:
    from lowbit.quantizer import QuantizedWeight


def expected_zero(scheme: QuantScheme) -> int | None:
    """The constant zero of a symmetric scheme; None for asym."""
    half = 2 ** (scheme.bits - 1)
    return {"sym": half, "sym_full": half, "sym_omni": half - 1, "nl": 0}.get(scheme.kind)


def record_problems(record: QuantizedWeight) -> list[str]:
    """All violations of the record's layout and invariants, in checking order (empty when valid)."""
    scheme, codes, scale, zero = record.scheme, record.codes, record.scale, record.zero
    if codes.dtype != torch.uint8 or codes.dim() != 2 or codes.numel() == 0:
        return [f"codes must be a non-empty uint8 [m, k] tensor, got {codes.dtype} {tuple(codes.shape)}"]
    m, k = codes.shape
    groups = scheme.num_groups(k)
    if scale.dtype != scheme.torch_scale_dtype or tuple(scale.shape) != (m, groups):
        return [f"scale must be {scheme.torch_scale_dtype} [{m}, {groups}], got {scale.dtype} {tuple(scale.shape)}"]
    zero_dtype = torch.float32 if scheme.min_offset else torch.int32  # an offset in weight units, or a code
    if zero.dtype != zero_dtype or tuple(zero.shape) != (m, groups):
        return [f"zero must be {zero_dtype} [{m}, {groups}], got {zero.dtype} {tuple(zero.shape)}"]
    problems = []
    if int(codes.max()) > scheme.qmax:
        problems.append(f"codes exceed qmax {scheme.qmax}")
    if scheme.min_offset:  # K-quant mins are unsigned; a Q4_1/Q5_1 offset has either sign
        if not bool(torch.isfinite(zero).all()) or (scheme.double_quant is not None and float(zero.min()) < 0):
            problems.append("offsets must be finite (and >= 0 for K-quants)")
    elif int(zero.min()) < 0 or int(zero.max()) > scheme.qmax:
        problems.append(f"zeros outside [0, {scheme.qmax}]")
    if not bool(torch.isfinite(scale).all()) or bool((scale == 0).any()):
        problems.append("scales must be finite and non-zero")
    if scheme.kind not in ("sym_full", "nl") and bool((scale < 0).any()):
        problems.append("negative scales are only allowed for sym_full (and GGUF IQ4_NL)")
    expected = expected_zero(scheme)
    if expected is not None and bool((zero != expected).any()):
        problems.append(f"{scheme.kind} needs a constant zero of {expected}")
    if record.g_idx is not None:
        problems.extend(g_idx_problems(record.g_idx, k, groups, scheme.group_width(k)))
    if record.bias is not None and tuple(record.bias.shape) != (m,):
        problems.append(f"bias must have shape [{m}], got {tuple(record.bias.shape)}")
    return problems


def g_idx_problems(g_idx: Tensor, k: int, groups: int, width: int) -> list[str]:
    """Each group is used exactly g times (a partial last group by its remainder)."""
    if g_idx.dtype != torch.int32 or tuple(g_idx.shape) != (k,):
        return [f"g_idx must be int32 [{k}], got {g_idx.dtype} {tuple(g_idx.shape)}"]
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
        return [f"g_idx values must lie in [0, {groups})"]
    counts = torch.bincount(g_idx.long(), minlength=groups)
    expected = torch.full((groups,), width, dtype=counts.dtype)
    expected[-1] = k - (groups - 1) * width
    if not torch.equal(counts.cpu(), expected):
        return [f"g_idx must use every group exactly {width} times (the last {int(expected[-1])})"]
    return []
