"""Exact stored bytes of one quantized linear in each export format, from its shape and scheme alone.

A mixed-precision budget (`--scheme auto:<bits>`) is a promise about the files, so each option's cost must be what
the writer will store, not bits/8: the packed code words, the scales at their stored dtype, the packed zero points
and the g_idx, as `export/compressed_tensors.py` and `export/gptq.py` lay them out (the tests check these numbers
against the tensors an export writes). `fake` stores float weights, so a budget there counts the compressed-tensors
layout the same run would pack to.
"""

from __future__ import annotations

from lowbit.errors import LowbitError
from lowbit.formats.packing import packed_words
from lowbit.scheme import QuantScheme

INT32_BYTES = 4
WEIGHT_SHAPE_BYTES = 16  # compressed-tensors' weight_shape: two int64
STORED_FORMATS = ("compressed-tensors", "gptq", "fake")


def stores_zero(scheme: QuantScheme) -> bool:
    """Whether the format keeps a zero point per group (sym and sym_full store none: export/validate.is_symmetric)."""
    return scheme.kind not in ("sym", "sym_full")


def ct_linear_bytes(shape: tuple[int, int], scheme: QuantScheme, scale_bytes: int, packing: str = "dense") -> int:
    """compressed-tensors pack-quantized: weight_packed [m, words(k)], weight_scale [m, G] at the model's dtype,
    weight_shape, and for asymmetric schemes weight_zero_point [words(m), G] (packed along out_features)."""
    m, k = shape
    groups = scheme.num_groups(k)
    total = m * packed_words(k, scheme.bits, packing) * INT32_BYTES + m * groups * scale_bytes + WEIGHT_SHAPE_BYTES
    if stores_zero(scheme):
        total += packed_words(m, scheme.bits, packing) * groups * INT32_BYTES
    return total


def gptq_linear_bytes(shape: tuple[int, int], scheme: QuantScheme) -> int:
    """GPTQ v1: qweight [words(k), m], qzeros [G, words(m)] (always, also for sym), fp16 scales [G, m], g_idx [k]."""
    m, k = shape
    groups = scheme.num_groups(k)
    qweight = packed_words(k, scheme.bits, "legacy") * m * INT32_BYTES
    qzeros = groups * packed_words(m, scheme.bits, "legacy") * INT32_BYTES
    return qweight + qzeros + groups * m * 2 + k * INT32_BYTES


def linear_stored_bytes(
    shape: tuple[int, int], scheme: QuantScheme, fmt: str, *, scale_bytes: int, ct_packing: str | None = None
) -> int:
    """Bytes linear `shape` [out, in] takes in `fmt` under `scheme` (bias excluded: it is float in every format).

    `scale_bytes`: the element size of the model dtype compressed-tensors stores scales in."""
    if fmt in ("compressed-tensors", "fake"):
        return ct_linear_bytes(shape, scheme, scale_bytes, ct_packing or "dense")
    if fmt == "gptq":
        return gptq_linear_bytes(shape, scheme)
    raise LowbitError(
        f"a mixed-precision budget cannot be counted in format {fmt!r}: use --format {', '.join(STORED_FORMATS)}"
    )
