"""Real low-bit exports: validate, build every tensor and config in memory, then write (formats.md §1, §5).

`prepare_packed` raises before anything touches the disk; `PreparedExport.write` fills the temporary directory
that `atomic_output_dir` renames into place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.export import compressed_tensors as ct
from lowbit.export import gptq
from lowbit.export.layout import ExportPlan, build_plan, config_dict, float_remainder, write_checkpoint
from lowbit.export.validate import validate_export
from lowbit.formats.files import RECORD_FILE
from lowbit.formats.packing import PACKINGS
from lowbit.quantizer import QuantizedWeight

log = logging.getLogger(__name__)

PACKED_FORMATS = ("compressed-tensors", "gptq")


@dataclass
class PreparedExport:
    """Everything a packed checkpoint holds, validated and ready to write."""

    plan: ExportPlan
    tensors: dict[str, Tensor]
    quantization_config: dict[str, Any]
    extra_files: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def write(self, directory: Path, tokenizer: Any, record: dict[str, Any]) -> None:
        """Write weights, config.json (with quantization_config), tokenizer and the run record."""
        config = config_dict(self.plan.model, self.quantization_config)
        files = {**self.extra_files, RECORD_FILE: record}
        write_checkpoint(directory, self.tensors, config, self.plan.model, tokenizer, files)


def _lowbit_meta(record: dict[str, Any], fmt: str, target: str, packing: str | None) -> dict[str, Any]:
    config = record.get("config", {})
    return {
        "format": fmt,
        "target": target,
        "ct_packing": packing,
        "recipe": config.get("recipe"),
        "scheme": config.get("scheme"),
        "activation": record.get("activation"),
        "model": record.get("model"),
        "version": record.get("versions", {}).get("lowbit"),
    }


def prepare_packed(
    model: nn.Module,
    records: dict[str, QuantizedWeight],
    fmt: str,
    *,
    target: str = "any",
    tp: int = 1,
    ct_packing: str | None = None,
    packer: str = "lowbit",
    run_record: dict[str, Any] | None = None,
    act_bits: int = 16,
) -> PreparedExport:
    """Validate against `target` and build the tensors of a `compressed-tensors` or `gptq` export.

    `act_bits` is the run's activation width: 8 writes compressed-tensors W8A8 `int-quantized`; below 8 (and any
    W-A run as gptq) is refused, since only `fake` exports hold activation simulations.
    """
    if fmt not in PACKED_FORMATS:
        raise LowbitError(f"unknown packed format {fmt!r}: use one of {', '.join(PACKED_FORMATS)}")
    if ct_packing is not None and ct_packing not in PACKINGS:
        raise LowbitError(f"unknown ct_packing {ct_packing!r}: use one of {', '.join(PACKINGS)}")
    plan = build_plan(model, records)
    warnings = validate_export(plan, fmt, target, tp=tp, ct_packing=ct_packing, act_bits=act_bits)
    meta = _lowbit_meta(run_record or {}, fmt, target, ct_packing)
    tensors = float_remainder(plan)
    if fmt == "compressed-tensors":
        tensors.update(ct.compressed_tensors_tensors(plan, ct_packing or "dense", packer, act_bits))
        return PreparedExport(plan, tensors, ct.quantization_config(plan, meta, act_bits), {}, warnings)
    quantize_config = gptq.quantize_config(plan, meta)
    tensors.update(gptq.gptq_tensors(plan))
    return PreparedExport(plan, tensors, quantize_config, {"quantize_config.json": quantize_config}, warnings)
