"""Model tensor names <-> checkpoint keys, for reading (streaming) and writing (synthetic checkpoints) block-wise.

For the dense families the two are the same names. transformers 5 builds sparse-MoE experts as fused 3-D
parameters (Qwen3-MoE: `mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]) while
checkpoints keep the hub's per-expert linears (`mlp.experts.N.gate_proj.weight` [I, H], ...); its
WeightConverter joins them at load and splits them at save. The ArchSpec's `ExpertsSpec` already states that
layout (which fused parameter stacks which per-expert linears, and whether it is transposed), so that table is
all the mapping needs: no transformers-internal converter is called.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.arch import ArchSpec, ExpertParam
from lowbit.errors import LowbitError

Shape = tuple[int, ...]


class KeyMap:
    """Which checkpoint keys (and stored shapes) make up each model tensor, and how to assemble them."""

    def __init__(self, arch: ArchSpec | None) -> None:
        experts = arch.experts if arch is not None else None
        self._path = experts.path if experts else ""
        self._fused: dict[str, ExpertParam] = (
            {f"{experts.path}.{p.fused}": p for p in experts.params} if experts else {}
        )

    def _match(self, name: str) -> tuple[str, ExpertParam] | None:
        for suffix, param in self._fused.items():
            if name == suffix or name.endswith(f".{suffix}"):
                return name[: len(name) - len(suffix)], param
        return None

    def is_fused(self, name: str) -> bool:
        """Whether the model tensor `name` is assembled from several checkpoint keys."""
        return self._match(name) is not None

    def sources(self, name: str, shape: Shape) -> list[tuple[str, Shape]]:
        """The checkpoint keys holding the model tensor `name` of `shape`, with their stored shapes, in order."""
        hit = self._match(name)
        if hit is None:
            return [(name, tuple(shape))]
        prefix, param = hit
        if len(shape) != 3:
            raise LowbitError(f"'{name}' has shape {tuple(shape)}, not the fused 3-D [experts, rows, cols] layout")
        count, rows, cols = shape if not param.transposed else (shape[0], shape[2], shape[1])
        if rows % len(param.parts):
            raise LowbitError(f"'{name}' rows {rows} do not split into the per-expert linears {param.parts}")
        part_shape = (rows // len(param.parts), cols)
        return [
            (f"{prefix}{self._path}.{index}.{part}.weight", part_shape)
            for index in range(count)
            for part in param.parts
        ]

    def assemble(self, name: str, shape: Shape, values: dict[str, Tensor]) -> Tensor:
        """The model tensor `name` from its checkpoint tensors `values` (keyed as `sources` names them)."""
        hit = self._match(name)
        if hit is None:
            return values[name]
        _, param = hit
        keys = [key for key, _ in self.sources(name, shape)]
        per_expert = len(param.parts)
        experts = []
        for start in range(0, len(keys), per_expert):
            weight = torch.cat([values[key] for key in keys[start : start + per_expert]], dim=0)
            experts.append(weight.T if param.transposed else weight)
        return torch.stack(experts).contiguous()
