"""Codes and weights on a scheme's grid: the [m, G, g] group view, rounding to codes, and decoding them back.

Pure tensor functions under the quantizer (lowbit/quantizer.py computes the scales and zeros that pick a grid).
Groups are handled as a [m, G, g] view of each [m, k] tensor. When g does not divide k, the row is padded by
repeating its last column, which leaves the partial last group's min and max unchanged; the padding is sliced off
again afterwards.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.gguf_types import codebook_index, codebook_value
from lowbit.scheme import QuantScheme


def round_ste(x: Tensor) -> Tensor:
    """Round half to even with an identity gradient; the forward value is exactly round(x)."""
    return x + (torch.round(x) - x).detach()


# ----------------------------------------------------------------------------------------------------------
# grouping helpers


def _check_matrix(w: Tensor, what: str = "weight") -> None:
    if not isinstance(w, Tensor) or w.dim() != 2 or not w.is_floating_point():
        shape = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
        raise LowbitError(f"{what} must be a 2-D float tensor [out_features, in_features], got {shape}")
    if w.shape[0] == 0 or w.shape[1] == 0:
        raise LowbitError(f"{what} has an empty shape {tuple(w.shape)}: pass a non-empty [out, in] matrix")


def _width(k: int, num_groups: int, group_size: int) -> int:
    """Group width for a [*, k] tensor whose params have `num_groups` columns (1 group: the whole row)."""
    if num_groups == 1:
        return k
    if group_size < 1 or -(-k // group_size) != num_groups:
        raise LowbitError(
            f"scale/zero have {num_groups} groups but {k} columns with group_size {group_size} need "
            f"{-(-k // group_size) if group_size >= 1 else 1}: pass qparams computed for this weight"
        )
    return group_size


def _grouped(x: Tensor, g: int) -> Tensor:
    """[m, k] -> [m, G, g]; a partial last group is padded with copies of the row's last column."""
    m, k = x.shape
    pad = -k % g
    if pad:
        x = torch.cat([x, x[:, -1:].expand(m, pad)], dim=1)
    return x.reshape(m, -1, g)


def _ungrouped(x: Tensor, k: int) -> Tensor:
    """[m, G, g] -> [m, k], dropping the padding of a partial last group."""
    x = x.reshape(x.shape[0], -1)
    return x if x.shape[1] == k else x[:, :k]


def _check_param(t: Tensor | None, m: int, num_groups: int, name: str) -> None:
    if t is None:
        return
    try:
        shape = torch.broadcast_shapes(tuple(t.shape), (m, num_groups))
    except RuntimeError:
        shape = None
    if shape != (m, num_groups):
        raise LowbitError(
            f"{name} has shape {tuple(t.shape)}: pass one factor per (row, group), shape [{m}, {num_groups}]"
        )


# ----------------------------------------------------------------------------------------------------------
# codes and dequantization


def _codes(x: Tensor, scale: Tensor, zero: Tensor, v: Tensor | None, ste: bool, scheme: QuantScheme) -> Tensor:
    """c = clamp(round(x / s + v) + z, 0, qmax) on broadcast-compatible tensors; with an offset zero (a weight-unit
    offset, QuantScheme.min_offset) c = clamp(round((x + z) / s + v), 0, qmax); on a codebook (IQ4_NL) the
    rounding runs on the continuous code of x / s, so v moves codes as it does on a uniform grid."""
    if scheme.codebook is not None:
        t = codebook_index(x / scale, scheme.codebook)
    else:
        t = (x + zero) / scale if scheme.min_offset else x / scale
    if v is not None:
        t = t + v
    r = round_ste(t) if ste else torch.round(t)
    return (r if scheme.min_offset or scheme.codebook else r + zero).clamp(0, scheme.qmax)


def _decode(c: Tensor, s: Tensor, z: Tensor, offset: bool, codebook: tuple[int, ...] | None) -> Tensor:
    if codebook is not None:
        return s * codebook_value(c, codebook)
    return s * c - z if offset else s * (c - z)


def decode(codes: Tensor, scale: Tensor, zero: Tensor, scheme: QuantScheme) -> Tensor:
    """The weights of codes on broadcast-compatible qparams: s * (c - z), s * c - z for an offset zero (K-quants'
    `d*sc*q - dmin*m`, which llama.cpp computes the same way, so the two agree bit for bit), or s * level[c] on a
    codebook (IQ4_NL's `d * kvalues[q]`)."""
    return _decode(codes, scale, zero, scheme.min_offset, scheme.codebook)


def _check_v(v: Tensor | None, shape: torch.Size) -> None:
    if v is not None and tuple(v.shape) != tuple(shape):
        raise LowbitError(f"rounding offset v has shape {tuple(v.shape)}: pass one offset per weight, {tuple(shape)}")


def _check_qparams(scale: Tensor, zero: Tensor, m: int) -> None:
    if scale.dim() != 2 or scale.shape[0] != m or tuple(zero.shape) != tuple(scale.shape):
        raise LowbitError(
            f"scale {tuple(scale.shape)} and zero {tuple(zero.shape)} do not fit {m} rows: "
            "pass both as [out_features, groups], e.g. from compute_qparams"
        )


def _g_idx_long(g_idx: Tensor, k: int, scale: Tensor) -> Tensor:
    """Validated int64 copy of a column -> group map, on the scale's device (for index_select)."""
    groups = scale.shape[1]
    if g_idx.dim() != 1 or g_idx.shape[0] != k or g_idx.is_floating_point():
        raise LowbitError(f"g_idx must be an integer tensor of shape [{k}]: pass the group of each input column")
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
        raise LowbitError(f"g_idx values must lie in [0, {groups}): pass one scale/zero column per group")
    return g_idx.to(device=scale.device, dtype=torch.long)


def quantize_codes(
    w: Tensor,
    scale: Tensor,
    zero: Tensor,
    scheme: QuantScheme,
    *,
    v: Tensor | None = None,
    ste: bool = False,
    g_idx: Tensor | None = None,
) -> Tensor:
    """Integer codes clamp(round(w/s + v) + z, 0, qmax) as fp32 [m, k]; round_ste when `ste`.

    Column i uses group g_idx[i], or i // group_size when g_idx is None. Params with a single column
    ([m, 1]) apply to every column, so GPTQ quantizes one column at a time with
    `quantize_codes(w[:, i:i+1], scale[:, j:j+1], zero[:, j:j+1], scheme)` where j is column i's group,
    e.g. with the qparams from `compute_qparams(w[:, j*g:(j+1)*g], scheme)`.
    """
    _check_matrix(w)
    m, k = w.shape
    _check_qparams(scale, zero, m)
    _check_v(v, w.shape)
    w32, v32 = w.float(), None if v is None else v.float()
    if g_idx is not None:
        idx = _g_idx_long(g_idx, k, scale)
        s, z = scale.index_select(1, idx), zero.index_select(1, idx)
        return _codes(w32, s, z, v32, ste, scheme)
    g = _width(k, scale.shape[1], scheme.group_size)
    vg = None if v32 is None else _grouped(v32, g)
    codes = _codes(_grouped(w32, g), scale[..., None], zero[..., None], vg, ste, scheme)
    return _ungrouped(codes, k)


def dequantize(
    codes: Tensor,
    scale: Tensor,
    zero: Tensor,
    group_size: int,
    g_idx: Tensor | None = None,
    *,
    offset: bool = False,
    codebook: tuple[int, ...] | None = None,
) -> Tensor:
    """fp32 W_hat[o, i] = scale[o, G(i)] * (codes[o, i] - zero[o, G(i)]), any input dtypes; with `offset`
    (QuantScheme.min_offset) scale[o, G(i)] * codes[o, i] - zero[o, G(i)]; with a `codebook`
    (QuantScheme.codebook) scale[o, G(i)] * codebook[codes[o, i]]."""
    if codes.dim() != 2 or codes.numel() == 0:
        raise LowbitError(f"codes have shape {tuple(codes.shape)}: pass a non-empty [out_features, in_features] matrix")
    m, k = codes.shape
    _check_qparams(scale, zero, m)
    c32, s32, z32 = codes.to(torch.float32), scale.to(torch.float32), zero.to(torch.float32)
    if g_idx is not None:
        idx = _g_idx_long(g_idx, k, scale)
        s_i, z_i = s32.index_select(1, idx), z32.index_select(1, idx)
        return _decode(c32, s_i, z_i, offset, codebook)
    g = _width(k, scale.shape[1], group_size)
    return _ungrouped(_decode(_grouped(c32, g), s32[..., None], z32[..., None], offset, codebook), k)
