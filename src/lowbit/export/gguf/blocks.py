"""Pack lowbit's codes and scales into GGUF blocks, bit for bit: the legacy types here, K-quants in kblocks.py.

Pure numpy on one record: nothing is re-quantized. The record's weight is `s * (c - z)` per group of 32; the block
stores it as (layouts: ggml-common.h, gguf-py quants.py)

- sym / sym_full (z = 2^(b-1)): `d = s`, `q = c` (Q8_0: the int8 `c - 128`), decoded `d * (q - 2^(b-1))`;
- sym_omni (z = 2^(b-1) - 1): `d = -s`, `q = qmax - c`, since `-s * ((qmax - c) - 2^(b-1)) = s * (c - z)`;
- asym (Q4_1/Q5_1): `d = s`, `m = -s * z` (an fp16 value by the quantizer's grid rule), decoded `d * q + m`.

Every product is exact in fp32 (11-bit scale times a code of at most 8 bits), so gguf-py's and llama.cpp's
dequantization equal `QuantizedWeight.dequantize()` value for value.
"""

from __future__ import annotations

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.export.gguf.kblocks import pack_k
from lowbit.formats.gguf_types import GGUF_TYPES, GgufType
from lowbit.quantizer import QuantizedWeight


def _halves(x: np.ndarray) -> np.ndarray:
    """[n] fp16 values -> [n, 2] little-endian bytes."""
    return x.astype("<f2").view(np.uint8).reshape(-1, 2)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """[n, 32] codes -> [n, 16] bytes: low nibble element j, high nibble element j + 16."""
    return ((q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)).astype(np.uint8)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """[n, 32] 5-bit codes -> [n, 4] bytes: bit i of the little-endian uint32 is bit 4 of element i."""
    return np.packbits((q >> 4).astype(np.uint8) & 1, axis=-1, bitorder="little")


def check_record(record: QuantizedWeight, gguf_type: GgufType) -> None:
    """The record lies on the type's grid: contiguous groups of the type's size, no g_idx, its scale dtype, zeros."""
    scheme = record.scheme
    m, k = record.shape
    if scheme.bits != gguf_type.bits or scheme.group_size != gguf_type.group or scheme.kind not in gguf_type.kinds:
        raise LowbitError(
            f"a {scheme.name} weight cannot be stored as GGUF {gguf_type.name} ({gguf_type.bits}-bit, groups of "
            f"{gguf_type.group}, {'/'.join(gguf_type.kinds)}): quantize with --scheme gguf:{gguf_type.name}"
        )
    if k % gguf_type.block:
        raise LowbitError(f"in_features {k} is not a multiple of the GGUF block {gguf_type.block}")
    if record.g_idx is not None and not torch.equal(
        record.g_idx.cpu().to(torch.int64), torch.arange(k, dtype=torch.int64) // gguf_type.group
    ):
        raise LowbitError(
            "GGUF blocks are contiguous columns but this weight has an act-order g_idx: use "
            "--opt gptq.static_groups=true (or no act-order) with --format gguf"
        )
    if str(record.scale.dtype).removeprefix("torch.") != gguf_type.scale_dtype:
        raise LowbitError(
            f"GGUF {gguf_type.name} scales are {gguf_type.scale_dtype}, not {record.scale.dtype}: use "
            f"--scheme gguf:{gguf_type.name}"
        )
    if gguf_type.asymmetric:
        offset = -record.zero if scheme.min_offset else -(record.scale.float() * record.zero.float())
        if not bool(torch.equal(offset.half().float(), offset)):
            raise LowbitError(
                f"GGUF {gguf_type.name} stores the offset -s*z in fp16, but this weight's offsets are not fp16 "
                f"values: quantize with --scheme gguf:{gguf_type.name} (its quantizer keeps them on the grid)"
            )


def pack_record(record: QuantizedWeight) -> np.ndarray:
    """The record's GGUF blocks as uint8 [out_features, in_features / block * type_size] (row-major, as gguf-py)."""
    scheme = record.scheme
    if scheme.gguf not in GGUF_TYPES:
        raise LowbitError(f"scheme {scheme.name} is not a GGUF type: quantize with --scheme gguf:<type>")
    gguf_type = GGUF_TYPES[scheme.gguf]
    check_record(record, gguf_type)
    m, k = record.shape
    n = m * k // gguf_type.block
    codes = record.codes.cpu().numpy().astype(np.int32).reshape(n, gguf_type.block)
    if gguf_type.double_quant:
        per = gguf_type.block // gguf_type.group
        scales = record.scale.cpu().to(torch.float32).reshape(n, per)
        offsets = record.zero.cpu().to(torch.float32).reshape(n, per) if scheme.min_offset else None
        try:
            return pack_k(codes, scales, gguf_type, offsets).reshape(m, -1)
        except ValueError as error:
            raise LowbitError(
                f"a {scheme.name} weight's scales are not on the GGUF {gguf_type.name} grid ({error}): quantize with "
                f"--scheme gguf:{gguf_type.name}"
            ) from None
    scale = record.scale.cpu().numpy().astype(np.float16).reshape(n)
    zero = record.zero.cpu().numpy().reshape(n)
    if scheme.kind == "sym_omni":
        codes, scale = scheme.qmax - codes, -scale
    parts = [_halves(scale)]
    if gguf_type.asymmetric:
        offset = -zero if scheme.min_offset else -(scale.astype(np.float32) * zero.astype(np.int32))
        parts.append(_halves(offset.astype(np.float16)))
    if gguf_type.bits == 8:
        parts.append((codes - 128).astype(np.int8).view(np.uint8))
    else:
        if gguf_type.bits == 5:
            parts.append(_high_bits(codes))
        parts.append(_nibbles(codes))
    blocks = np.concatenate(parts, axis=1)
    assert blocks.shape[1] == gguf_type.type_size
    return blocks.reshape(m, -1)
