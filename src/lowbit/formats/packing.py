"""Bit packing of unsigned b-bit codes into int32 words (see docs/formats.md).

Two layouts, both little-end first (element 0 in the lowest bits of word 0):
- dense: element i starts at global bit i*b; an element may straddle two words. This is compressed-tensors'
  layout since its dense-packing change (PR #715) and, for b in {1, 2, 4, 8}, identical to the legacy one.
- legacy: floor(32/b) elements per word, spare high bits left zero (older compressed-tensors, GPTQ v1).

Packing runs along the last dimension; callers transpose for the output-dimension packings. Pure torch, no
third-party code, so exports and the CPU runtime need no optional package.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lowbit.errors import LowbitError

PACKINGS = ("dense", "legacy")


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise LowbitError(f"cannot pack {bits}-bit codes: use a bit width from 1 to 8")


def packed_words(n: int, bits: int, packing: str = "dense") -> int:
    """Words needed for `n` codes of `bits` bits."""
    _check_bits(bits)
    if packing == "dense":
        return math.ceil(n * bits / 32)
    return math.ceil(n / (32 // bits))


def pack_codes(codes: Tensor, bits: int, packing: str = "dense") -> Tensor:
    """Pack unsigned codes [rows, n] (values < 2^bits) into int32 [rows, packed_words(n)]."""
    _check_bits(bits)
    if packing not in PACKINGS:
        raise LowbitError(f"unknown packing {packing!r}: use one of {', '.join(PACKINGS)}")
    rows, n = codes.shape
    values = codes.to(torch.int64)
    if packing == "legacy" or 32 % bits == 0:
        per_word = 32 // bits
        words = math.ceil(n / per_word)
        values = torch.nn.functional.pad(values, (0, words * per_word - n)).reshape(rows, words, per_word)
        shifts = torch.arange(per_word, dtype=torch.int64) * bits
        packed = (values << shifts).sum(dim=-1)
    else:  # dense with straddling fields: 32 elements fill exactly `bits` words
        chunks = math.ceil(n / 32)
        values = torch.nn.functional.pad(values, (0, chunks * 32 - n)).reshape(rows, chunks, 32)
        start = torch.arange(32, dtype=torch.int64) * bits
        word, offset = start // 32, start % 32
        packed = torch.zeros(rows, chunks, bits, dtype=torch.int64)
        packed.scatter_add_(2, word.expand(rows, chunks, 32), (values << offset) & 0xFFFFFFFF)
        spill = offset + bits > 32
        high = values[..., spill] >> (32 - offset[spill])
        packed.scatter_add_(2, (word[spill] + 1).expand(rows, chunks, int(spill.sum())), high)
        packed = packed.reshape(rows, chunks * bits)[:, : packed_words(n, bits)]
    # Two's-complement reinterpretation of the unsigned 32-bit words.
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_codes(packed: Tensor, bits: int, n: int, packing: str = "dense") -> Tensor:
    """Inverse of `pack_codes`: int32 [rows, words] -> uint8 codes [rows, n]."""
    _check_bits(bits)
    if packing not in PACKINGS:
        raise LowbitError(f"unknown packing {packing!r}: use one of {', '.join(PACKINGS)}")
    rows, words = packed.shape
    if words != packed_words(n, bits, packing):
        raise LowbitError(
            f"packed tensor has {words} words per row but {n} {bits}-bit codes need {packed_words(n, bits, packing)}:"
            " the checkpoint's weight_shape or bit width does not match its packed tensor"
        )
    wide = packed.to(torch.int64) & 0xFFFFFFFF
    mask = (1 << bits) - 1
    if packing == "legacy" or 32 % bits == 0:
        per_word = 32 // bits
        shifts = torch.arange(per_word, dtype=torch.int64) * bits
        out = (wide.unsqueeze(-1) >> shifts) & mask
        return out.reshape(rows, -1)[:, :n].to(torch.uint8)
    chunks = math.ceil(n / 32)
    wide = torch.nn.functional.pad(wide, (0, chunks * bits + 1 - words))
    start = torch.arange(chunks * 32, dtype=torch.int64) * bits
    word, offset = start // 32, start % 32
    both = wide[:, word] | (wide[:, word + 1] << 32)
    return ((both >> offset) & mask)[:, :n].to(torch.uint8)
