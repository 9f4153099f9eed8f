"""Real low-bit exports: validate and build the config, then write block by block (docs/formats.md).

`prepare_packed` raises before anything touches the disk; `PreparedExport.write` fills the temporary directory
that `atomic_output_dir` renames into place, packing one decoder block at a time through the shard writer
(blocks.py), so only one block's packed tensors and one open shard are in memory beside the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.errors import LowbitError
from lowbit.export import compressed_tensors as ct
from lowbit.export import gptq
from lowbit.export.blocks import ExportContext, write_weights
from lowbit.export.layout import ExportPlan, build_plan, config_dict, write_checkpoint
from lowbit.export.shards import DEFAULT_MAX_SHARD_SIZE, ShardWriter, parse_max_shard_size
from lowbit.export.validate import validate_export
from lowbit.formats.files import RECORD_FILE
from lowbit.formats.packing import PACKINGS
from lowbit.quantizer import QuantizedWeight

log = logging.getLogger(__name__)

PACKED_FORMATS = ("compressed-tensors", "gptq")


@dataclass
class PreparedExport:
    """Everything a packed checkpoint holds, validated and ready to write (tensors are packed while writing)."""

    plan: ExportPlan
    context: ExportContext
    quantization_config: dict[str, Any]
    extra_files: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def write(
        self,
        directory: Path,
        tokenizer: Any,
        record: dict[str, Any],
        *,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        writer: ShardWriter | None = None,
    ) -> list[str]:
        """Write weights (sharded past `max_shard_size`), config.json, tokenizer and the run record; weight files."""
        max_bytes = parse_max_shard_size(max_shard_size)
        config = config_dict(self.plan.model, self.quantization_config)
        files = {**self.extra_files, RECORD_FILE: record}
        write_checkpoint(directory, config, self.plan.model, tokenizer, files)
        return write_weights(directory, self.context, self.plan.model, self.plan.records, max_bytes, writer=writer)


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
    streamed: bool = False,
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
    warnings = validate_export(plan, fmt, target, tp=tp, ct_packing=ct_packing, act_bits=act_bits, streamed=streamed)
    if fmt == "compressed-tensors":
        packed = ct.ct_format(act_bits) == ct.PACK_QUANTIZED
        ct.check_packer(packer, ct_packing or "dense", {r.scheme.bits for r in records.values()} if packed else set())
    meta = _lowbit_meta(run_record or {}, fmt, target, ct_packing)
    context = ExportContext(fmt, model, plan.dtype, ct_packing or "dense", packer, act_bits)
    if fmt == "compressed-tensors":
        return PreparedExport(plan, context, ct.quantization_config(plan, meta, act_bits), {}, warnings)
    quantize_config = gptq.quantize_config(plan, meta)
    return PreparedExport(plan, context, quantize_config, {"quantize_config.json": quantize_config}, warnings)
