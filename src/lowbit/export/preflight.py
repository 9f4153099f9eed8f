"""Preflight: the export checks that need only the model's shapes and the scheme, run before any calibration, so
a format the run could never write is refused in seconds (the checks that read codes run at export time)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.arch import ArchSpec
from lowbit.errors import LowbitError
from lowbit.export.gguf.checks import GGUF_FORMAT, check_gguf_scheme, preflight_gguf
from lowbit.export.layout import ExportPlan, block_structure
from lowbit.export.validate import Findings, check_act_format, check_plan, report_findings
from lowbit.formats.packing import PACKINGS
from lowbit.scheme import QuantScheme


@dataclass(frozen=True)
class PlannedWeight:
    """What preflight knows of a linear before it is quantized: its shape and scheme, no codes yet."""

    shape: tuple[int, int]
    scheme: QuantScheme
    g_idx: Tensor | None = None  # a stand-in non-trivial map when the run's GPTQ is act-order without static groups


def _stand_in_g_idx(k: int, scheme: QuantScheme) -> Tensor:
    """A group map like act-order's (columns out of order); trivial when one group spans the row, as act-order's is."""
    return torch.arange(k - 1, -1, -1, dtype=torch.int32) // scheme.group_width(k)


def preflight_export(
    model: nn.Module,
    arch: ArchSpec,
    scheme: QuantScheme,
    fmt: str,
    target: str = "any",
    tp: int = 1,
    ct_packing: str | None = None,
    act_order_groups: bool = False,
    tokenizer: Any = None,
) -> list[str]:
    """Before any calibration or tuning: refuse an export the scheme and the model's shapes can never satisfy.

    `act_order_groups`: the run's GPTQ is act-order without static groups, so its records will carry a g_idx.
    `tokenizer`: checked for `gguf`, whose file carries it (None: checked at export).

    Runs the same checks as `validate_export` on stand-in records for the linears the engine will quantize (every
    block's `arch.linears`, all with `scheme`), skipping only those that read codes or scales (GPTQ's zero of 0,
    the exact cast of scales). Returns the warnings unlogged; "fake" holds anything check_act_format lets through.
    """
    check_act_format(fmt, scheme)
    check_gguf_scheme(fmt, scheme)
    if fmt == "fake":
        return []
    if fmt == GGUF_FORMAT:
        if act_order_groups:
            raise LowbitError(
                "GGUF blocks are contiguous columns and cannot hold GPTQ's act-order g_idx: use "
                "--opt gptq.static_groups=true (or act-order off) with --format gguf"
            )
        linears = {
            f"{arch.block_name(index)}.{name}": (int(linear.weight.shape[0]), int(linear.weight.shape[1]))
            for index, block in enumerate(arch.blocks(model))
            for name, linear in arch.linears(block).items()
        }
        preflight_gguf(model, linears, scheme, tokenizer)
        return []
    if ct_packing is not None and ct_packing not in PACKINGS:
        raise LowbitError(f"unknown ct_packing {ct_packing!r}: use one of {', '.join(PACKINGS)}")
    records: dict[str, PlannedWeight] = {}
    for index, block in enumerate(arch.blocks(model)):
        for name, linear in arch.linears(block).items():
            shape = (int(linear.weight.shape[0]), int(linear.weight.shape[1]))
            g_idx = _stand_in_g_idx(shape[1], scheme) if act_order_groups else None
            records[f"{arch.block_name(index)}.{name}"] = PlannedWeight(shape, scheme, g_idx)
    fused, row = block_structure(model)
    dtype = model.get_input_embeddings().weight.dtype
    plan = ExportPlan(model, records, [], fused, row, dtype)  # type: ignore[arg-type]  # stand-in records
    findings = Findings()
    check_plan(plan, fmt, target, tp, ct_packing, scheme.act_bits, findings, values=False)
    return report_findings(findings, fmt, target, log_warnings=False)  # the export logs them once, at save time
