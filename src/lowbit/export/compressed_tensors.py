"""compressed-tensors exports (see docs/formats.md): `pack-quantized` weight-only INT, and W8A8 `int-quantized`.

W8A8 (a run with 8-bit activations): per linear an unpacked int8 `weight` (code - zero, symmetric) and a
`weight_scale` [m, 1] (channel strategy); the config declares dynamic per-token symmetric int8 input activations,
which is what vLLM serves (lowbit simulated asymmetric ones; the validation warns).

Per quantized linear `<p>`: `weight_packed` (int32, codes packed along in_features), `weight_scale` (model dtype),
`weight_shape`, and for asymmetric schemes `weight_zero_point` (signed zeros packed along out_features). A
non-trivial act-order map (g_idx) is refused: compressed-tensors 0.20 removed actorder "group". lowbit's packer
(formats/packing.py) writes the words; it is byte-identical to compressed-tensors' `pack_to_int32` for every width
(checked by the tests against the pinned version), so the export needs no optional package. With
`packer="compressed-tensors"` the library's own `pack_to_int32` is used instead (it must be installed).
"""

from __future__ import annotations

import logging
from importlib import metadata
from typing import Any

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.export.layout import ExportPlan, exact_regex
from lowbit.export.validate import is_symmetric, scheme_key
from lowbit.formats.files import LOWBIT_KEY
from lowbit.formats.packing import pack_codes
from lowbit.quantizer import QuantizedWeight

log = logging.getLogger(__name__)

PINNED_VERSION = "0.20.0"  # the compressed-tensors version the tests load exports with (dense packing)
PACKERS = ("lowbit", "compressed-tensors")


def written_against() -> str:
    """The installed compressed-tensors version, else the pinned one the layout follows."""
    try:
        return metadata.version("compressed-tensors")
    except metadata.PackageNotFoundError:
        return PINNED_VERSION


def _library_pack(codes: Tensor, bits: int) -> Tensor:
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    except ImportError as error:
        raise LowbitError(
            "packer='compressed-tensors' needs the package: pip install compressed-tensors (or use packer='lowbit')"
        ) from error
    signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    return pack_to_int32(signed, bits)


def check_packer(packer: str, packing: str, bits: set[int]) -> None:
    """Refuse, before anything is written, a packer that cannot pack these widths (the tensors are built later).

    `bits`: the widths to be packed (empty for W8A8 int-quantized, which packs nothing).
    """
    if packer not in PACKERS:
        raise LowbitError(f"unknown packer {packer!r}: use one of {', '.join(PACKERS)}")
    if packer == "compressed-tensors" and bits:
        if packing != "dense" and any(32 % b for b in bits):
            raise LowbitError("the pinned compressed-tensors packs densely: use packer='lowbit' for legacy packing")
        _library_pack(torch.zeros(1, 8, dtype=torch.uint8), 4)  # the package is installed


def _pack(codes: Tensor, bits: int, packing: str, packer: str) -> Tensor:
    if packer == "compressed-tensors" and bits:
        if packing != "dense" and 32 % bits:
            raise LowbitError("the pinned compressed-tensors packs densely: use packer='lowbit' for legacy packing")
        return _library_pack(codes, bits)
    return pack_codes(codes, bits, packing)


def layer_tensors(
    record: QuantizedWeight, dtype: torch.dtype, packing: str = "dense", packer: str = "lowbit"
) -> dict[str, Tensor]:
    """The tensors of one linear, without its prefix (bias is written with the float remainder)."""
    bits = record.scheme.bits
    m, k = record.shape
    tensors = {
        "weight_packed": _pack(record.codes, bits, packing, packer),
        "weight_scale": record.scale.to(dtype),
        "weight_shape": torch.tensor([m, k], dtype=torch.int64),
    }
    if not is_symmetric(record):
        # Stored signed zero zp = z - 2^(b-1); packing adds 2^(b-1) back, so the fields hold z itself.
        tensors["weight_zero_point"] = _pack(record.zero.to(torch.uint8).T.contiguous(), bits, packing, packer).T
    return tensors


def _weights_args(record: QuantizedWeight) -> dict[str, Any]:
    bits, g = record.scheme.bits, record.scheme.group_size
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": is_symmetric(record),
        "strategy": "channel" if g == -1 else "group",
        "group_size": None if g == -1 else g,
        "dynamic": False,
        "actorder": None,  # act-order group maps are refused (validate.py); static-group act-order needs no flag
        "observer": "minmax",
        "block_structure": None,
    }


INT_QUANTIZED = "int-quantized"
PACK_QUANTIZED = "pack-quantized"


def ct_format(act_bits: int) -> str:
    """The compressed-tensors format of a run: W8A8 int-quantized with 8-bit activations, else pack-quantized."""
    return INT_QUANTIZED if act_bits == 8 else PACK_QUANTIZED


def _input_activation_args(act_bits: int) -> dict[str, Any] | None:
    """Dynamic per-token symmetric int8 activations (docs/formats.md W8A8); None for weight-only."""
    if act_bits >= 16:
        return None
    return {
        "num_bits": act_bits,
        "type": "int",
        "symmetric": True,
        "strategy": "token",
        "group_size": None,
        "dynamic": True,
        "actorder": None,
        "observer": None,
        "block_structure": None,
    }


def quantization_config(plan: ExportPlan, lowbit_meta: dict[str, Any], act_bits: int = 16) -> dict[str, Any]:
    """config.json's quantization_config: one config group per distinct weight scheme."""
    fmt = ct_format(act_bits)
    groups: dict[tuple, list[str]] = {}
    for name, record in plan.records.items():
        groups.setdefault(scheme_key(record), []).append(name)
    config_groups = {}
    for index, names in enumerate(groups.values()):
        config_groups[f"group_{index}"] = {
            "targets": ["Linear"] if len(groups) == 1 else exact_regex(names),
            "weights": _weights_args(plan.records[names[0]]),
            "input_activations": _input_activation_args(act_bits),
            "output_activations": None,
            "format": fmt,
        }
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "version": written_against(),
        "ignore": list(plan.float_linears),
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "global_compression_ratio": None,
        "config_groups": config_groups,
        LOWBIT_KEY: lowbit_meta,
    }


def int8_layer_tensors(record: QuantizedWeight, dtype: torch.dtype) -> dict[str, Tensor]:
    """W8A8 `int-quantized` tensors of one symmetric 8-bit per-channel linear: int8 weight = code - zero, scale."""
    if record.scheme.bits != 8 or record.scale.shape[1] != 1 or not is_symmetric(record):
        raise LowbitError(f"int-quantized needs 8-bit symmetric per-channel weights, got {record.scheme.name}")
    signed = record.codes.to(torch.int16) - record.zero.to(torch.int16)
    return {"weight": signed.to(torch.int8), "weight_scale": record.scale.to(dtype)}
