"""GPTQ v1 export (`quant_method: gptq`, `checkpoint_format: gptq`) for 2, 4 and 8 bits (see docs/formats.md).

Per linear: `qweight` int32 [k*b/32, m] (codes packed along in_features, row 32/b*r in the lowest bits of word r),
`qzeros` int32 [G, m*b/32] (zero - 1 packed along out_features), `scales` fp16 [G, m], `g_idx` int32 [k].
Dequantization: W[o, i] = scales[g_idx[i], o] * (code[i, o] - (qzeros[g_idx[i], o] + 1)). The validation refuses
an asymmetric zero of 0 (stored -1 borrows into the neighbouring field) before this code runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.export.layout import ExportPlan
from lowbit.export.validate import has_g_idx, is_symmetric
from lowbit.formats.files import LOWBIT_KEY
from lowbit.formats.packing import pack_codes
from lowbit.quantizer import QuantizedWeight
from lowbit.version import __version__


def group_index(record: QuantizedWeight) -> Tensor:
    """The column -> group map: the record's g_idx, or floor(i/g)."""
    if record.g_idx is not None:
        return record.g_idx.to(torch.int32)
    k = record.shape[1]
    return torch.arange(k, dtype=torch.int32) // record.scheme.group_width(k)


def layer_tensors(record: QuantizedWeight) -> dict[str, Tensor]:
    """qweight, qzeros, scales and g_idx of one linear (bias is written with the float remainder)."""
    bits = record.scheme.bits
    zero = record.zero.to(torch.int64) - 1
    if int(zero.min()) < 0:
        raise LowbitError("GPTQ v1 cannot store a zero of 0: use --format compressed-tensors")
    return {
        "qweight": pack_codes(record.codes, bits, "legacy").T.contiguous(),
        "qzeros": pack_codes(zero.to(torch.uint8).T.contiguous(), bits, "legacy"),
        "scales": record.scale.to(torch.float16).T.contiguous(),
        "g_idx": group_index(record),
    }


def quantize_config(plan: ExportPlan, lowbit_meta: dict[str, Any]) -> dict[str, Any]:
    """quantize_config.json (also config.json's quantization_config); GPTQ v1 holds one scheme per model."""
    schemes = {(r.scheme.bits, r.scheme.group_size, is_symmetric(r)) for r in plan.records.values()}
    if len(schemes) != 1:
        raise LowbitError(
            f"GPTQ v1 holds one scheme per model but this one has {len(schemes)}: use --format compressed-tensors"
        )
    (bits, group_size, sym), *_ = schemes
    inside = [name for name in plan.float_linears if name != "lm_head"]
    if inside:
        raise LowbitError(
            f"GPTQ v1 loaders quantize every block linear but {inside[0]} stays in float: "
            "use --format compressed-tensors"
        )
    desc_act = any(has_g_idx(r) for r in plan.records.values())
    return {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "static_groups": False,
        "true_sequential": True,
        "damp_percent": 0.01,
        "lm_head": False,
        "modules_in_block_to_quantize": None,
        "meta": {"quantizer": [f"lowbit:{__version__}"], "method": lowbit_meta.get("recipe")},
        LOWBIT_KEY: lowbit_meta,
    }
