"""The GGUF block types lowbit quantizes to, as plain data, and the grid rule the asymmetric legacy types add.

Each GGUF weight type is a lowbit integer scheme whose codes and scales the file stores as they are (no code is
re-derived at export): Q4_0/Q5_0/Q8_0 are symmetric g32 (`w = d * (q - 2^(b-1))`, fp16 `d`), Q4_1/Q5_1 asymmetric
g32 (`w = d * q + m`, fp16 `d` and fp16 `m`). lowbit's asymmetric weight is `s * (c - z)` with an integer zero, so
`m = -s * z` must itself be an fp16 value for the file to hold the tuned weight exactly: `fp16_offset_scale`
rounds the scale (before any code is chosen) to the nearest value that makes it so.

This module imports nothing of lowbit's, so `scheme.py` can read the table (see docs in /work/shared/notes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class GgufType:
    """One GGUF weight type as a lowbit scheme: bits, group (block) size, the default kind, and its ggml ids."""

    name: str  # lowbit's spelling, e.g. "q4_0"
    bits: int
    block: int  # values per block (lowbit's group size for the legacy types)
    kinds: tuple[str, ...]  # lowbit kinds the type stores exactly; the first is the default
    ggml_type: int  # gguf.GGMLQuantizationType value
    file_type: int  # gguf.LlamaFileType value of a file whose weights are all this type
    type_size: int  # bytes per block

    @property
    def asymmetric(self) -> bool:
        """Whether the type stores an offset m (Q4_1/Q5_1): lowbit's asym kind with an fp16 offset s*z."""
        return self.kinds[0] == "asym"


# ids from gguf.constants (GGMLQuantizationType, LlamaFileType, GGML_QUANT_SIZES); tests check them against gguf-py
GGUF_TYPES: dict[str, GgufType] = {
    t.name: t
    for t in (
        GgufType("q4_0", 4, 32, ("sym_full", "sym", "sym_omni"), 2, 2, 18),
        GgufType("q4_1", 4, 32, ("asym",), 3, 3, 20),
        GgufType("q5_0", 5, 32, ("sym_full", "sym", "sym_omni"), 6, 8, 22),
        GgufType("q5_1", 5, 32, ("asym",), 7, 9, 24),
        GgufType("q8_0", 8, 32, ("sym_full", "sym", "sym_omni"), 8, 7, 34),
    )
}

# llama.cpp type names lowbit knows but cannot write yet (double-quantized K-quant grids and the mixes over them)
PLANNED_GGUF_TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q2_k_s", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_m")

_FP16_BITS = 11  # significant bits of an IEEE half


def _round_significant(x: Tensor, bits: int) -> Tensor:
    """x rounded (half to even) to `bits` significant bits, exactly in fp32 (x > 0)."""
    mantissa, exponent = torch.frexp(x)  # x = mantissa * 2^exponent, mantissa in [0.5, 1)
    return torch.ldexp(torch.round(torch.ldexp(mantissa, torch.full_like(exponent, bits))), exponent - bits)


def _fp16_exact(x: Tensor) -> Tensor:
    """Whether each fp32 value is an fp16 value (finite)."""
    half = x.to(torch.float16)
    return torch.isfinite(half) & (half.to(torch.float32) == x)


def fp16_offset_scale(scale: Tensor, zero: Tensor) -> Tensor:
    """The scale nearest `scale` (fp32 holding fp16 values > 0) for which `scale * zero` is an fp16 value too.

    Q4_1/Q5_1 store `m = -s*z` in fp16; s*z is exact in fp32 (11 + 5 bits) but needs up to 16 significant bits.
    Dropping the scale's low bits until the product fits (at most 5 for a 5-bit zero, none when z is 0 or a power
    of two) keeps s within 2^-6 of itself (relative) and keeps it an fp16 value. Not differentiable: callers pass
    gradients straight through.
    """
    s = scale.detach().to(torch.float32)
    z = zero.detach().to(torch.float32)
    best = s.clone()
    done = _fp16_exact(s * z)
    for bits in range(_FP16_BITS - 1, 0, -1):
        if bool(done.all()):
            break
        candidate = _round_significant(s, bits)
        fits = ~done & (candidate > 0) & _fp16_exact(candidate) & _fp16_exact(candidate * z)
        best = torch.where(fits, candidate, best)
        done = done | fits
    return best
