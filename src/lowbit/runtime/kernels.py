"""torch's CPU low-bit matmul kernels for `PackedLinear`: which layers qualify, their weight layout, the matmuls.

Dequantizing a whole weight on every forward makes decode several times slower than float; these kernels read
the packed codes inside the matmul instead. Contracts, checked on torch 2.13 (CPU build, AVX512):

int4, `torch._weight_int4pack_mm_for_cpu(x, w, gk, sz)`:
- w = `torch._convert_weight_to_int4pack_for_cpu(codes, inner_k_tiles)`: codes int32 [N, K] in [0, 16) (16 packs
  silently to garbage), N % 16 == 0, K even; uint8 [N, K/2] in a blocked layout that depends on the CPU's vector
  width; inner_k_tiles is ignored on CPU.
- gk in {32, 64, 128, 256}; sz [K/gk, N, 2] *contiguous* (a transposed view gives wrong numbers without an error),
  dtype == x.dtype; the weight is (q - 8) * sz[k//gk, n, 0] + sz[k//gk, n, 1]. lowbit's w = s * (q - zero) is
  therefore sz = (s, s * (8 - zero)); a larger group (or a whole row) repeats its (s, z) over several kernel groups.
- x: 2-D, contiguous, fp32/bf16/fp16; the output is [M, N] in x's dtype; no autograd (inference only).
- Only bf16 runs the vectorized (AVX512 tinygemm) kernel: fp32 input takes a scalar path, measured 15x slower than
  an fp32 F.linear at M = 1 and 100x at M = 512 on this project's CPU, where bf16 is 3.3x faster than fp32 at M = 1
  and 1.4x at M = 512 (SmolLM2 shapes). So the int4 path computes in bf16: the input and sz are rounded to bf16
  (the kernel accumulates in fp32 and rounds its output to bf16), the output is cast back to x's dtype. Its error is
  bf16's: a few 1e-3 of max|y| (runtime.py states the tolerance the tests hold).

int8, `torch._weight_int8pack_mm(x, w, s)`: w int8 [N, K], s [N] in x's dtype; y = x @ (w * s[:, None])^T, one scale
per output channel, no zero point; fp32 agrees to ~2e-6 relative (K = 1536). lowbit uses it for per-channel
weights whose code - zero fits int8 (every symmetric 8-bit kind).
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from typing import Literal

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError

log = logging.getLogger(__name__)

Kernel = Literal["auto", "reference"]
KERNELS: tuple[str, ...] = ("auto", "reference")
INT4_GROUPS = (256, 128, 64, 32)  # the group sizes the int4 CPU kernel accepts, largest first
INT4_OP = "torch._weight_int4pack_mm_for_cpu"
INT4_TOL = 2e-2  # the int4 path's bf16 error bound, relative to max|y| (measured: a few 1e-3)
INT8_OP = "torch._weight_int8pack_mm"


def check_kernel(kernel: str) -> None:
    """Refuse an unknown kernel choice with the ones that exist."""
    if kernel not in KERNELS:
        raise LowbitError(f"kernel={kernel!r} is not known: use 'auto' (torch's low-bit CPU kernels) or 'reference'")


def plan(bits: int, groups: int, group_size: int, n: int, k: int, act_order: bool) -> tuple[str, int, str]:
    """(path, kernel group size, why) for a layer's shape and scheme; the path is "int4", "int8" or "reference"."""
    if act_order:
        return "reference", 0, "act-order g_idx"
    width = k if groups == 1 else group_size
    if groups * width != k:
        return "reference", 0, f"partial last group ({k} columns, group {width})"
    if bits == 8:
        if groups != 1:
            return "reference", 0, "8-bit with groups (the int8 kernel is per-channel only)"
        return ("int8", 0, INT8_OP) if int8_available() else ("reference", 0, f"{INT8_OP} unavailable")
    if bits != 4:
        return "reference", 0, f"{bits}-bit codes"
    if n % 16:
        return "reference", 0, f"out_features {n} not a multiple of 16"
    kernel_group = next((g for g in INT4_GROUPS if width % g == 0), 0)
    if not kernel_group:
        return "reference", 0, f"group {width} not a multiple of 32"
    return ("int4", kernel_group, INT4_OP) if int4_available() else ("reference", 0, f"{INT4_OP} unavailable")


# ----------------------------------------------------------------------------------------------------------
# int4


def int4_weights(codes: Tensor, scale: Tensor, zero: Tensor, kernel_group: int) -> tuple[Tensor, Tensor]:
    """(uint8 kernel weight [N, K/2], bf16 scales_and_zeros [K/gk, N, 2]) of codes [N, K] and per-group s, zero."""
    n, k = codes.shape
    weight = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    s = scale.to(torch.float32)
    pairs = torch.stack([s, s * (8.0 - zero.to(torch.float32))], dim=-1)  # [N, G, 2]
    repeat = k // kernel_group // pairs.shape[1]
    if repeat > 1:
        pairs = pairs.repeat_interleave(repeat, dim=1)
    return weight, pairs.transpose(0, 1).to(torch.bfloat16).contiguous()


def _nibbles(packed: Tensor) -> Tensor:
    flat = packed.reshape(-1)
    return torch.stack([flat & 15, flat >> 4], dim=-1).reshape(-1)


def int4_codes(weight: Tensor, n: int, k: int) -> Tensor:
    """The codes [N, K] (uint8) of a kernel weight, whatever its CPU-specific layout.

    The layout is a fixed permutation of 4-bit fields; packing the hex digits of each element's index finds
    where every element went, so no layout is hard-coded. O(N*K*log16(N*K)): for checks, not for the forward.
    """
    index = torch.arange(n * k, dtype=torch.int64).view(n, k)
    source = torch.zeros(n * k, dtype=torch.int64)
    for digit in range(max(1, math.ceil(math.log2(n * k) / 4))):
        probe = ((index >> (4 * digit)) & 15).to(torch.int32)
        source |= _nibbles(torch._convert_weight_to_int4pack_for_cpu(probe, 1)).to(torch.int64) << (4 * digit)
    codes = torch.empty(n * k, dtype=torch.uint8)
    codes[source] = _nibbles(weight)
    return codes.view(n, k)


def int4_linear(x: Tensor, weight: Tensor, kernel_group: int, scales_and_zeros: Tensor) -> Tensor:
    """x [M, K] (contiguous) times the int4 weight, computed in bf16 (the kernel's fast path): [M, N] in x's dtype."""
    out = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), weight, kernel_group, scales_and_zeros)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# int8


def int8_weights(codes: Tensor, zero: Tensor) -> Tensor | None:
    """int8 [N, K] = code - zero (one zero per row), or None where a value leaves int8 (asymmetric zeros)."""
    diff = codes.to(torch.int16) - zero.to(torch.int16).view(-1, 1)
    if int(diff.min()) < -128 or int(diff.max()) > 127:
        return None
    return diff.to(torch.int8)


def int8_linear(x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    """x [M, K] (contiguous) times the int8 per-channel weight: [M, N] in x's dtype."""
    return torch._weight_int8pack_mm(x, weight, scale if scale.dtype == x.dtype else scale.to(x.dtype))


# ----------------------------------------------------------------------------------------------------------
# availability: one small self-check per process, so a torch without the ops (or with a changed contract) falls
# back to the reference path instead of producing wrong numbers


@functools.cache
def int4_available() -> bool:
    """Whether the int4 CPU kernel exists here and computes lowbit's weight (checked once on random data)."""
    generator = torch.Generator().manual_seed(0)
    n, k, group = 32, 128, 32
    codes = torch.randint(0, 16, (n, k), generator=generator, dtype=torch.uint8)
    scale = torch.rand(n, k // group, generator=generator) + 0.5
    zero = torch.randint(0, 16, (n, k // group), generator=generator, dtype=torch.uint8)
    x = torch.randn(3, k, generator=generator)
    try:
        weight, sz = int4_weights(codes, scale, zero, group)
        got = int4_linear(x, weight, group, sz)
        roundtrip = torch.equal(int4_codes(weight, n, k), codes)
    except (AttributeError, RuntimeError) as error:
        log.warning("%s is unavailable (%s): packed 4-bit layers use the reference path", INT4_OP, error)
        return False
    dense = (codes.float().view(n, -1, group) - zero.float().unsqueeze(-1)).mul(scale.unsqueeze(-1)).view(n, k)
    expected = x @ dense.T
    ok = roundtrip and float((got - expected).abs().max()) <= INT4_TOL * float(expected.abs().max())
    if not ok:
        log.warning("%s does not match lowbit's weight on this torch: packed 4-bit layers use the reference", INT4_OP)
    return ok


@functools.cache
def int8_available() -> bool:
    """Whether the int8 CPU kernel exists here and computes lowbit's weight (checked once on random data)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(-128, 128, (16, 64), generator=generator, dtype=torch.int8)
    scale, x = torch.rand(16, generator=generator), torch.randn(3, 64, generator=generator)
    try:
        got = int8_linear(x, weight, scale)
    except (AttributeError, RuntimeError) as error:
        log.warning("%s is unavailable (%s): packed 8-bit layers use the reference path", INT8_OP, error)
        return False
    ok = torch.allclose(got, x @ (weight.float() * scale[:, None]).T, rtol=1e-4, atol=1e-4)
    if not ok:
        log.warning("%s does not match lowbit's weight on this torch: packed 8-bit layers use the reference", INT8_OP)
    return ok


def log_paths(model: nn.Module, kernel: str) -> Counter:
    """Log which path each PackedLinear runs (debug per layer, one info line per model); the counts per path."""
    counts: Counter = Counter()
    for name, module in model.named_modules():
        path = getattr(module, "path", None)
        if path is None or not hasattr(module, "path_reason"):
            continue
        counts[path] += 1
        log.debug("%s: %s path (%s)", name, path, module.path_reason)
    if counts:
        summary = ", ".join(f"{count} {path}" for path, count in sorted(counts.items()))
        log.info("packed runtime (kernel=%s): %s linear layers", kernel, summary)
    return counts
