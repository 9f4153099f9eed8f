"""The GGUF block types lowbit quantizes to, as plain data, and the grid rules they add to the quantizer.

Each GGUF weight type is a lowbit integer scheme whose codes and scales the file stores as they are (no code is
re-derived at export): Q4_0/Q5_0/Q8_0 are symmetric g32 (`w = d * (q - 2^(b-1))`, fp16 `d`), Q4_1/Q5_1 asymmetric
g32 (`w = d * q + m`, fp16 `d` and fp16 `m`). Their default kind, `asym_min`, is that grid itself: lowbit's zero
holds the offset -m in weight units (`w = s*c - z`, QuantScheme.min_offset) and the range is the block's raw min and
max, as llama.cpp's. Their `asym` kind is lowbit's integer-zero weight `s * (c - z)`, for which `m = -s * z` must
itself be an fp16 value: `fp16_offset_scale` rounds the scale (before any code is chosen) to the nearest value that
makes it so. The K-quants (Q2_K ... Q6_K)
are double-quantized: each group scale is an fp16 super-scale `d` (one per 256 values) times a small integer
(`double_quant_scale`), which the writer splits back exactly (`split_double_quant`).

This module imports nothing of lowbit's, so `scheme.py` can read the table (block layouts: docs/formats.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor


@dataclass(frozen=True)
class GgufType:
    """One GGUF weight type as a lowbit scheme: bits, group size, the kinds it stores, its ggml ids and layout."""

    name: str  # lowbit's spelling, e.g. "q4_0"
    bits: int
    group: int  # lowbit's group size: the legacy block (32), or a K-quant's sub-block (16 or 32)
    kinds: tuple[str, ...]  # lowbit kinds the type stores exactly; the first is the default
    ggml_type: int  # gguf.GGMLQuantizationType value
    file_type: int  # gguf.LlamaFileType value of a file whose weights are (mostly) this type
    type_size: int  # bytes per block
    block: int = 32  # values per GGUF block: 32, or a K-quant's super-block of 256
    sub_scale_max: int = 0  # K-quants: largest integer sub-block scale (times one fp16 d per super-block)
    codebook: tuple[int, ...] | None = None  # non-uniform types (IQ4_NL): the value of each code, times fp16 d

    @property
    def asymmetric(self) -> bool:
        """Whether the type stores an fp16 offset m per block (Q4_1/Q5_1): lowbit's `asym_min` kind (m = -z), or its
        `asym` kind with the offset -s*z kept an fp16 value."""
        return "asym" in self.kinds

    @property
    def double_quant(self) -> bool:
        """K-quants: each group's scale is d * sc with an integer sc <= sub_scale_max and one fp16 d per block."""
        return self.sub_scale_max > 0

    @property
    def scale_dtype(self) -> str:
        """Legacy scales are fp16 values; K-quant scales d * sc need up to 18 significant bits (float32)."""
        return "float32" if self.double_quant else "float16"


# ids from gguf.constants (GGMLQuantizationType, LlamaFileType, GGML_QUANT_SIZES); tests check them against gguf-py.
# The layouts with mins (Q2_K, Q4_K, Q5_K) default to lowbit's `asym_min` kind, their own grid: `w = (d*sc)*q - dmin*m`
# with the offset dmin*m a second double-quantized value per group (`double_quant_min`). Their `sym` kind (and Q3_K,
# Q6_K) writes dmin = z * d and m_j = sc_j, so `(d*sc)*q - dmin*m = d*sc*(q - z)` exactly.
# IQ4_NL (llama.cpp's `kvalues_iq4nl`): 16 non-uniform levels, w = d * IQ4_NL_VALUES[q], fp16 d per block of 32
IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
GGUF_TYPES: dict[str, GgufType] = {
    t.name: t
    for t in (
        GgufType("q4_0", 4, 32, ("sym_full", "sym", "sym_omni"), 2, 2, 18),
        GgufType("q4_1", 4, 32, ("asym_min", "asym"), 3, 3, 20),
        GgufType("q5_0", 5, 32, ("sym_full", "sym", "sym_omni"), 6, 8, 22),
        GgufType("q5_1", 5, 32, ("asym_min", "asym"), 7, 9, 24),
        GgufType("q8_0", 8, 32, ("sym_full", "sym", "sym_omni"), 8, 7, 34),
        GgufType("q2_k", 2, 16, ("asym_min", "sym"), 10, 10, 84, 256, 15),
        GgufType("q3_k", 3, 16, ("sym",), 11, 11, 110, 256, 31),  # file type Q3_K_S: all Q3_K
        GgufType("q4_k", 4, 32, ("asym_min", "sym"), 12, 14, 144, 256, 63),  # file type Q4_K_S
        GgufType("q5_k", 5, 32, ("asym_min", "sym"), 13, 16, 176, 256, 63),  # file type Q5_K_S
        GgufType("q6_k", 6, 16, ("sym",), 14, 18, 210, 256, 127),
        # llama.cpp's fallback for Q2_K/Q3_K rows that are not a multiple of 256 (kind `nl`: codes index the table)
        GgufType("iq4_nl", 4, 32, ("nl",), 20, 25, 18, codebook=IQ4_NL_VALUES),
    )
}

# llama.cpp's mixes: name -> (the type of every tensor no rule overrides, gguf.LlamaFileType value); the per-linear
# rules are export/gguf/mixes.py, resolved before tuning
GGUF_MIXES: dict[str, tuple[str, int]] = {
    "q2_k_s": ("q2_k", 21),
    "q3_k_m": ("q3_k", 12),
    "q4_k_s": ("q4_k", 14),
    "q4_k_m": ("q4_k", 15),
    "q5_k_m": ("q5_k", 17),
}


def base_type(name: str) -> GgufType | None:
    """The GgufType a scheme's `gguf` names: the type itself, or a mix's default type; None when unknown."""
    if name in GGUF_MIXES:
        name = GGUF_MIXES[name][0]
    return GGUF_TYPES.get(name)


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


_FP16_TINY = 2.0**-24  # the smallest positive fp16 value


def double_quant_scale(scale: Tensor, per: int, sub_max: int) -> Tensor:
    """K-quant scales: each run of `per` group scales (one super-block) becomes d * sc, d = fp16(max / sub_max),
    sc = round(s / d) in [1, sub_max]; exact in fp32. Gradients pass the rounding straight through (d fixed).

    Params with fewer columns than a super-block (a searched slice) are returned as they are: only whole rows,
    or slices of whole super-blocks, lie on the grid (GPTQ fits super-block slices, methods/gptq/solve.py).
    """
    m, groups = scale.shape
    if groups % per:
        return scale
    s = scale.reshape(m, groups // per, per)
    d = (s.detach().amax(dim=-1, keepdim=True) / sub_max).to(torch.float16).to(torch.float32)
    d = d.clamp(min=_FP16_TINY)
    ratio = s / d
    sc = (ratio + (torch.round(ratio) - ratio).detach()).clamp(1, sub_max)
    return (d * sc).reshape(m, groups)


def double_quant_min(offset: Tensor, per: int, sub_max: int) -> Tensor:
    """K-quant mins: each run of `per` group offsets (>= 0) becomes dmin * m, dmin = fp16(max / sub_max), m =
    round(offset / dmin) in [0, sub_max]; exact in fp32, 0 where the super-block has no offset. Gradients pass the
    rounding straight through (dmin fixed). Fewer columns than a super-block: returned as they are (see above)."""
    m, groups = offset.shape
    if groups % per:
        return offset
    o = offset.reshape(m, groups // per, per)
    dmin = (o.detach().amax(dim=-1, keepdim=True) / sub_max).to(torch.float16).to(torch.float32)
    safe = torch.where(dmin > 0, dmin, torch.ones_like(dmin))
    ratio = o / safe
    q = (ratio + (torch.round(ratio) - ratio).detach()).clamp(0, sub_max)
    return torch.where(dmin > 0, dmin * q, torch.zeros_like(o)).reshape(m, groups)


def _split(values: Tensor, sub_max: int, smallest: int) -> tuple[Tensor, Tensor] | None:
    """(fp16 d [n], integers [n, per] in [smallest, sub_max]) with d * ints == values exactly, largest ints first;
    None when some super-block has no such pair. An all-zero super-block (offsets only) gets d = 0."""
    v = values.to(torch.float32)
    top = v.amax(dim=-1)
    d = torch.zeros_like(top)
    ints_out = torch.zeros_like(v)
    found = (top == 0) if smallest == 0 else torch.zeros_like(top, dtype=torch.bool)
    for count in range(sub_max, 0, -1):
        cand = (top / count).to(torch.float16).to(torch.float32)
        ints = torch.round(v / torch.where(cand > 0, cand, torch.ones_like(cand))[:, None])
        ok = (
            ~found
            & (cand > 0)
            & (cand * count == top)
            & ((cand[:, None] * ints) == v).all(dim=-1)
            & ((ints >= smallest) & (ints <= sub_max)).all(dim=-1)
        )
        d = torch.where(ok, cand, d)
        ints_out = torch.where(ok[:, None], ints, ints_out)
        found |= ok
        if bool(found.all()):
            break
    return (d, ints_out) if bool(found.all()) else None


def split_double_quant_min(offset: Tensor, sub_max: int) -> tuple[Tensor, Tensor]:
    """Inverse of `double_quant_min` for one row of super-blocks [n, per]: (fp16 dmin [n], integer m [n, per]) with
    dmin * m == offset exactly, or ValueError. A super-block whose offsets are all zero gets dmin = 0."""
    pair = _split(offset, sub_max, 0)
    if pair is None:
        raise ValueError("offsets are not dmin * m with one fp16 dmin per super-block")
    return pair


def split_double_quant(scale: Tensor, sub_max: int) -> tuple[Tensor, Tensor]:
    """Inverse of `double_quant_scale` for one row of super-blocks [n, per]: (fp16 d [n], integer sc [n, per]) with
    d * sc == scale exactly, or ValueError. Any exact pair decodes the same; the search tries the largest sc first.
    """
    pair = _split(scale, sub_max, 1)
    if pair is None:
        raise ValueError("scales are not d * sc with one fp16 d per super-block")
    return pair


@lru_cache(maxsize=8)
def _levels(table: tuple[int, ...], device: torch.device) -> Tensor:
    """The table as a float32 tensor, built once per device (the codebook functions run in training loops)."""
    return torch.tensor(table, dtype=torch.float32, device=device)


def codebook_index(y: Tensor, table: tuple[int, ...]) -> Tensor:
    """The continuous code of y on a non-uniform grid: piecewise linear between the table's levels, so code i sits
    at table[i] and round() picks the nearest level (each midpoint in value is a half-integer in code). Outside the
    table it extends its end segments; callers clamp. Differentiable in y."""
    levels = _levels(table, y.device)
    i = torch.bucketize(y.detach(), levels[1:-1])  # segment [levels[i], levels[i+1]], 0 .. n-2
    lo, hi = levels[i], levels[i + 1]
    return i.to(torch.float32) + (y - lo) / (hi - lo)


def codebook_value(codes: Tensor, table: tuple[int, ...]) -> Tensor:
    """table[codes] for integer-valued codes in [0, n-1], exactly; piecewise linear in between, so a
    straight-through code passes its gradient on at the segment's slope."""
    levels = _levels(table, codes.device)
    i = codes.detach().floor().clamp(0, len(table) - 2).to(torch.long)
    lo, hi = levels[i], levels[i + 1]
    return lo + (codes - i.to(torch.float32)) * (hi - lo)
