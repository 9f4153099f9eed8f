"""CPU runtime for packed weights: a Linear that keeps b-bit codes packed and computes with them.

Memory is that of the packed checkpoint (codes at b bits, scales, zeros). Two paths (`PackedLinear.path`):
- "int4" / "int8": torch's low-bit CPU matmul kernels read the codes inside the matmul (lowbit.runtime.kernels);
  decode no longer rebuilds a float weight per token. They hold the codes in the kernel's own layout (the same
  4 or 8 bits per weight) plus, for int4, a bf16 (scale, scale * (8 - zero)) pair per kernel group.
- "reference": each forward rebuilds the float weight scale * (code - zero) in fp32, exactly the weight lowbit's
  fake-quant model holds (docs/methods.md), multiplies, and drops it; a loaded export reproduces its logits bit
  for bit. Layers the kernels cannot take (2/3/5-7 bit, act-order g_idx, partial groups, grouped 8-bit, ...) and
  `kernel="reference"` use it.

Memory per weight at 4 bits, int4 path: codes 0.5 bytes + the bf16 pair (4 bytes per kernel group: 0.125 at g32,
0.0625 at g64) + the exported scale and zero kept for `dequantize()`. The reference path deliberately does not cache
the float weight (that is the float model's memory again); it subtracts the zero in uint8 rather than fp32.

Tolerance of the kernel paths (tests/test_runtime_kernels.py asserts it). int4 computes in bf16, the only input
dtype torch's int4 CPU kernel vectorizes (fp32 input runs a scalar loop 15-100x slower than fp32 F.linear): a
layer's output is within 2e-2 * max|output| of the reference path's on the same input, a model's logits within
3e-2 * max|logit| on the tests' tiny Llamas. Observed on SmolLM2-135M RTN W4 (g32, g64 sym/asym, per-channel):
layers <= 8.4e-3, logits <= 3.6e-2 * max|logit| (what a bf16 forward of the float model deviates by too); 32 greedy
tokens identical for g32 and g64 sym/asym, not for per-channel (it diverges within 32). int8 (per-channel symmetric)
stays fp32: within 1e-5 * max|output|. Use kernel="reference" for the bit-exact fake-quant numbers.
"""

from __future__ import annotations

import logging
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.formats.packing import pack_codes, unpack_codes
from lowbit.quantizer import QuantizedWeight
from lowbit.runtime import kernels

log = logging.getLogger(__name__)

_LITTLE_ENDIAN = sys.byteorder == "little"


def _unpack_fast(packed: Tensor, bits: int, k: int) -> Tensor:
    """Codes [m, k] as uint8 from dense little-end-first words; byte-wise when fields never straddle a byte."""
    if 8 % bits or not _LITTLE_ENDIAN:
        return unpack_codes(packed, bits, k)
    data = packed.view(torch.uint8)
    if bits == 8:
        return data[:, :k]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    fields = (data.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return fields.reshape(packed.shape[0], -1)[:, :k]


class PackedLinear(nn.Module):
    """y = x W^T + b with W held as packed codes plus per-group scale and zero (docs/formats.md layout).

    Built on the reference path; `use_kernel("auto")` moves it onto a kernel path where the layer qualifies.
    """

    def __init__(
        self,
        packed: Tensor,
        scale: Tensor,
        zero: Tensor,
        bits: int,
        group_size: int,
        in_features: int,
        bias: Tensor | None = None,
        g_idx: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.bits, self.group_size = bits, group_size
        self.in_features, self.out_features = in_features, int(packed.shape[0])
        self.groups = int(scale.shape[1])
        self.path, self.path_reason, self.kernel_group = "reference", "built on the reference path", 0
        self.register_buffer("packed", packed.to(torch.int32).contiguous())
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("zero", zero.to(torch.uint8).contiguous())
        self.register_buffer("g_idx", None if g_idx is None else g_idx.to(torch.long))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_record(cls, record: QuantizedWeight) -> PackedLinear:
        """Pack one lowbit record (codes, scale, zero) for the runtime (reference path)."""
        m, k = record.shape
        return cls(
            pack_codes(record.codes, record.scheme.bits),
            record.scale,
            record.zero,
            record.scheme.bits,
            record.scheme.group_size,
            k,
            record.bias,
            record.g_idx,
        )

    def use_kernel(self, kernel: kernels.Kernel = "auto") -> str:
        """Move onto torch's int4/int8 CPU kernel when this layer meets its constraints; returns the path taken.

        "reference" (or a layer the kernels cannot take) keeps the bit-exact reference path. One-way: the
        reference buffers are replaced by the kernel's, so memory stays that of one packed copy.
        """
        kernels.check_kernel(kernel)
        if self.path != "reference":
            return self.path
        if kernel == "reference":
            self.path_reason = "kernel='reference' asked for"
            return self.path
        n, k = self.out_features, self.in_features
        path, kernel_group, reason = kernels.plan(self.bits, self.groups, self.group_size, n, k, self.g_idx is not None)
        if path == "int4":
            weight, scales_and_zeros = kernels.int4_weights(self.codes(), self.scale, self.zero, kernel_group)
            self.packed = None  # scale stays: dequantize() is exact on every path
            self.register_buffer("int4_weight", weight)
            self.register_buffer("scales_and_zeros", scales_and_zeros)
            self.kernel_group = kernel_group
        elif path == "int8":
            weight = kernels.int8_weights(self.codes(), self.zero)
            if weight is None:
                path, reason = "reference", "8-bit zero point leaves int8 (asymmetric)"
            else:
                self.packed = None
                self.register_buffer("int8_weight", weight)
                self.register_buffer("int8_scale", self.scale[:, 0].to(torch.float32).contiguous())
        self.path, self.path_reason = path, reason
        return path

    def codes(self) -> Tensor:
        """The unsigned codes [out, in] (uint8); a kernel path rebuilds them from its layout (slower: for checks)."""
        if self.path == "int4":
            return kernels.int4_codes(self.int4_weight, self.out_features, self.in_features)
        if self.path == "int8":
            return (self.int8_weight.to(torch.int16) + self.zero.to(torch.int16)).to(torch.uint8)
        return _unpack_fast(self.packed, self.bits, self.in_features)

    def _scale(self) -> Tensor:
        """The per-group scale [out, G] in fp32 (exact on every path)."""
        return self.scale.to(torch.float32)

    def _expand(self, t: Tensor) -> Tensor:
        """Per-group [m, G] -> per-column [m, k] (a partial last group keeps its own column)."""
        if self.g_idx is not None:
            return t.index_select(1, self.g_idx)
        if t.shape[1] == 1:
            return t
        return t.repeat_interleave(self.group_size, dim=1)[:, : self.in_features]

    def dequantize(self) -> Tensor:
        """fp32 weight scale * (code - zero), bit for bit the fake-quant weight (on every path)."""
        codes, zero, scale = self.codes(), self.zero, self._scale()
        # code - zero is an exact small integer; below 8 bits it fits int8, so subtract in uint8 (wrapping) and
        # read the bytes as int8: one byte-wide pass instead of an fp32 subtraction, the same fp32 product.
        narrow = self.bits < 8
        if not narrow:
            codes, zero = codes.to(torch.int16), zero.to(torch.int16)
        groups = scale.shape[1]
        if self.g_idx is not None or groups == 1:
            diff = codes - self._expand(zero)
            return (diff.view(torch.int8) if narrow else diff).to(torch.float32).mul_(self._expand(scale))
        m, k, g = self.out_features, self.in_features, self.group_size
        if groups * g != k:  # partial last group: pad to whole groups, slice after
            codes = F.pad(codes, (0, groups * g - k))
        diff = codes.reshape(m, groups, g) - zero.unsqueeze(-1)
        grouped = (diff.view(torch.int8) if narrow else diff).to(torch.float32).mul_(scale.unsqueeze(-1))
        return grouped.view(m, groups * g)[:, :k]

    def forward(self, x: Tensor) -> Tensor:
        if self.path == "reference":
            weight = self.dequantize().to(x.dtype)
            return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))
        if x.device.type != "cpu":
            raise LowbitError(f"the {self.path} kernel path runs on CPU only: load with kernel='reference'")
        flat = x.reshape(-1, self.in_features)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        if self.path == "int4":
            out = kernels.int4_linear(flat, self.int4_weight, self.kernel_group, self.scales_and_zeros)
        else:
            out = kernels.int8_linear(flat, self.int8_weight, self.int8_scale)
        if self.bias is not None:
            out = out.add_(self.bias.to(out.dtype))
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, path={self.path}"
        )
