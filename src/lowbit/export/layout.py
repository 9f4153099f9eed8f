"""What every packed exporter shares: which linears are quantized, fused sets, the config and JSON files.

The float remainder (embeddings, norms, lm_head, biases, layers left in float) is taken from the model as it is
after quantization, so every folded transform is already in it (docs/formats.md); blocks.py builds it and the
packed tensors block by block for the shard writer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.arch import arch_for
from lowbit.errors import LowbitError
from lowbit.quantizer import QuantizedWeight


@dataclass
class ExportPlan:
    """The records to pack, the linears left in float, and the structure the validation needs."""

    model: nn.Module
    records: dict[str, QuantizedWeight]
    float_linears: list[str]  # nn.Linear modules not quantized (lm_head, anything a recipe left in float)
    fused_sets: list[tuple[str, ...]]  # full names of linears an engine loads as one (q/k/v, gate/up)
    row_parallel: set[str]  # linears split along in_features under tensor parallelism
    dtype: torch.dtype  # the model dtype (of its embeddings)


def block_structure(model: nn.Module) -> tuple[list[tuple[str, ...]], set[str]]:
    """Fused sets and row-parallel linears from the model's ArchSpec (empty when the family is unknown)."""
    try:
        arch = arch_for(model)
    except LowbitError:
        return [], set()
    fused, row = [], set()
    for index, block in enumerate(arch.blocks(model)):
        prefix = arch.block_name(index)
        names = set(arch.linear_names_for(block))
        for group in arch.scale_groups:
            if not names.issuperset(group.linears):
                continue  # the dense FFN's groups in a sparse MoE block
            if group.prev_kind == "norm" and len(group.linears) > 1:
                fused.append(tuple(f"{prefix}.{name}" for name in group.linears))
            if group.needs_same_shape:  # v -> o: o's input is the attention output, split by heads
                row.update(f"{prefix}.{name}" for name in group.linears)
        experts = arch.expert_linear_names(block)
        if experts:  # vLLM's FusedMoE loads every expert of a block as one layer; TP splits each down_proj's input
            fused.append(tuple(f"{prefix}.{name}" for name in experts))
            row.update(f"{prefix}.{name}" for name in experts if name.endswith(f".{arch.experts.down}"))
        else:
            row.add(f"{prefix}.{arch.ffn.contract}")
    return fused, row


def expert_linears(model: nn.Module) -> set[str]:
    """Full names of the per-expert linears of every sparse MoE block (empty for a dense or unknown family)."""
    try:
        arch = arch_for(model)
    except LowbitError:
        return set()
    blocks = arch.blocks(model)
    return {
        f"{arch.block_name(i)}.{name}" for i, block in enumerate(blocks) for name in arch.expert_linear_names(block)
    }


def build_plan(model: nn.Module, records: dict[str, QuantizedWeight]) -> ExportPlan:
    """Collect what the validation and the writers need; unknown record names are an error."""
    modules = dict(model.named_modules())
    missing = sorted(name for name in records if name not in modules)
    if missing:
        raise LowbitError(
            f"quantized record(s) {missing[:3]} name no module of the model: export the model they came from"
        )
    float_linears = [name for name, m in modules.items() if isinstance(m, nn.Linear) and name not in records]
    fused, row = block_structure(model)
    dtype = model.get_input_embeddings().weight.dtype
    return ExportPlan(model, records, float_linears, fused, row, dtype)


def config_dict(model: nn.Module, quantization_config: dict[str, Any]) -> dict[str, Any]:
    """The model's config.json content with `quantization_config` set."""
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config
    return config


def write_checkpoint(
    directory: Path,
    config: dict[str, Any],
    model: nn.Module,
    tokenizer: Any,
    extra_files: dict[str, Any] | None = None,
) -> None:
    """config.json, generation config, tokenizer and any extra JSON files (the weights: blocks.write_weights)."""
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    for name, content in (extra_files or {}).items():
        (directory / name).write_text(json.dumps(content, indent=2, sort_keys=True, default=str))


def exact_regex(names: list[str]) -> list[str]:
    """compressed-tensors `re:` targets that match exactly these module names."""
    return [f"re:^{re.escape(name)}$" for name in names]
