"""Pack K-quant super-blocks (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) from lowbit's double-quantized records.

A record's group scales are d * sc per super-block of 256 values (the quantizer's `double_quant_scale`); the pair
is recovered exactly (`split_double_quant`), never re-fitted. Codes c are unsigned:

- Q6_K: int8 scales sc, `w = d*sc*(q - 32)`, q = c;  Q3_K: 6-bit scales stored as sc + 32, `w = d*sc*(q - 4)`;
- Q2_K / Q4_K / Q5_K: unsigned scales and mins, `w = (d*sc)*q - dmin*m`. The `asym_min` kind's zeros are the
  offsets dmin*m themselves (`double_quant_min`), split back exactly (`split_double_quant_min`); the `sym` kind is
  written with dmin = z*d and m = sc, so `w = d*sc*(q - z)`. Every product is exact in fp32, as is the difference.

Byte orders are the inverse of gguf-py's `dequantize_blocks` (ggml-common.h); tests decode with gguf-py.
"""

from __future__ import annotations

import numpy as np
import torch

from lowbit.formats.gguf_types import GgufType, split_double_quant, split_double_quant_min


def _halves(x: np.ndarray) -> np.ndarray:
    return x.astype("<f2").view(np.uint8).reshape(-1, 2)


def _crumbs(codes: np.ndarray) -> np.ndarray:
    """[n, 256] 2-bit fields -> [n, 64]: byte 32h + l holds element 128h + 32s + l at bits 2s."""
    c = codes.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (c[:, :, 0] | c[:, :, 1] << 2 | c[:, :, 2] << 4 | c[:, :, 3] << 6).reshape(-1, 64)


def _bitplane(bits: np.ndarray, planes: int) -> np.ndarray:
    """[n, planes*32] single bits -> [n, 32]: byte l holds element 32b + l at bit b."""
    b = bits.reshape(-1, planes, 32).astype(np.uint8)
    out = np.zeros((b.shape[0], 32), dtype=np.uint8)
    for plane in range(planes):
        out |= b[:, plane] << plane
    return out


def _scales_6bit_pairs(sc: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes of 8 six-bit scales and 8 six-bit mins (gguf-py `Q4_K.get_scale_min`, inverted)."""
    sc, mins = sc.astype(np.uint8), mins.astype(np.uint8)
    low = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = mins[:, :4] | ((mins[:, 4:] >> 4) << 6)
    high = (sc[:, 4:] & 0x0F) | ((mins[:, 4:] & 0x0F) << 4)
    return np.concatenate([low, mid, high], axis=1)


def _q3_scales(sc: np.ndarray) -> np.ndarray:
    """Q3_K's 12 bytes of 16 six-bit values (sc + 32): low nibbles in bytes 0-7, top 2 bits in bytes 8-11."""
    v = (sc + 32).astype(np.uint8)
    low, high = v & 0x0F, v >> 4
    lbytes = low[:, :8] | (low[:, 8:] << 4)
    h = high.reshape(-1, 4, 4)  # [u, i] = value 4u + i
    hbytes = h[:, 0] | h[:, 1] << 2 | h[:, 2] << 4 | h[:, 3] << 6
    return np.concatenate([lbytes, hbytes], axis=1)


def pack_k(
    codes: np.ndarray, scale: torch.Tensor, gguf_type: GgufType, offset: torch.Tensor | None = None
) -> np.ndarray:
    """[n, 256] codes and [n, 256/group] float32 scales (one super-block per row), and for the `asym_min` kind the
    [n, 256/group] offsets dmin*m, -> [n, type_size] bytes."""
    d_t, sc_t = split_double_quant(scale, gguf_type.sub_scale_max)
    d = d_t.numpy().astype(np.float16)
    sc = sc_t.numpy().astype(np.int32)
    c = codes.astype(np.int32)
    if offset is None:
        dmin = (d.astype(np.float32) * 2 ** (gguf_type.bits - 1)).astype(np.float16)  # z * d: exact
        mins = sc
    else:
        dmin_t, mins_t = split_double_quant_min(offset, gguf_type.sub_scale_max)
        dmin, mins = dmin_t.numpy().astype(np.float16), mins_t.numpy().astype(np.int32)
    name = gguf_type.name
    if name == "q6_k":
        lo, hi = (c & 0x0F).reshape(-1, 2, 2, 64), (c >> 4).reshape(-1, 2, 4, 32)
        ql = (lo[:, :, 0] | lo[:, :, 1] << 4).reshape(-1, 128)
        qh = (hi[:, :, 0] | hi[:, :, 1] << 2 | hi[:, :, 2] << 4 | hi[:, :, 3] << 6).reshape(-1, 64)
        parts = [ql, qh, sc.astype(np.int8).view(np.uint8), _halves(d)]
    elif name == "q3_k":
        parts = [_bitplane(c >> 2, 8), _crumbs(c & 3), _q3_scales(sc), _halves(d)]
    elif name == "q2_k":
        scale_bytes = (sc | (mins << 4)).astype(np.uint8)
        parts = [scale_bytes, _crumbs(c), _halves(d), _halves(dmin)]
    else:  # q4_k, q5_k
        lo = (c & 0x0F).reshape(-1, 4, 2, 32)
        qs = (lo[:, :, 0] | lo[:, :, 1] << 4).reshape(-1, 128)
        parts = [_halves(d), _halves(dmin), _scales_6bit_pairs(sc, mins)]
        if name == "q5_k":
            parts.append(_bitplane(c >> 4, 8))
        parts.append(qs)
    return np.concatenate([np.asarray(p, dtype=np.uint8) for p in parts], axis=1)
