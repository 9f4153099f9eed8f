"""Mixture-of-experts blocks: the experts' fused 3-D parameters presented to every stage as per-expert linears.

transformers 5 stores the experts of a sparse MoE block fused (Qwen3-MoE: `mlp.experts.gate_up_proj` [E, 2I, H]
and `mlp.experts.down_proj` [E, H, I]); its conversion mapping splits them into the hub's per-expert names
(`mlp.experts.N.gate_proj.weight`, ...) on save and joins them again on load. No quantizer works on 3-D
parameters, so the arch layer replaces the fused module by `LinearExperts`: one `ExpertMLP` per expert whose
gate/up/down are plain `nn.Linear`s, computing the same function. Every stage then sees ordinary 2-D linears, named
exactly as the hub checkpoint names them (`mlp.experts.3.gate_proj`), and every export writes those names.

`ExpertsSpec` is the declarative part an ArchSpec holds: where the experts are, which router (kept float) picks
them, how each fused parameter splits into per-expert linears, and the per-expert true-sequential order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class ExpertParam:
    """A fused 3-D parameter of the experts module and the per-expert linears it stacks.

    `fused` [E, rows, cols] holds, for expert e, the weights of `parts` stacked along the rows in this order
    (`gate_up_proj` [E, 2I, H] = [gate; up]); `transposed` marks families that store [E, in, out] instead.
    """

    fused: str
    parts: tuple[str, ...]
    transposed: bool = False


@dataclass(frozen=True)
class ExpertsSpec:
    """Where a sparse block's experts live and how they become per-expert linears (names relative to the block).

    `sequential` are the per-expert true-sequential subsets (relative to one expert); GPTQ quantizes each subset of
    every expert together, since all experts read the same block state. `gate`, `up` and `down` name the SwiGLU
    roles of an expert's linears. `router` (and `shared_gate`, for families with a gated shared expert) stay float:
    they are not linears of the block. `shared` are the shared expert's true-sequential subsets, quantized as
    ordinary linears. `count_attr`/`top_k_attr` name the config attributes with the expert count and top-k.
    """

    path: str
    router: str
    params: tuple[ExpertParam, ...]
    sequential: tuple[tuple[str, ...], ...]
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    shared: tuple[tuple[str, ...], ...] = ()
    shared_gate: str | None = None
    count_attr: str = "num_experts"
    top_k_attr: str = "num_experts_per_tok"

    @property
    def float_modules(self) -> tuple[str, ...]:
        """Modules of a sparse block that stay float by design (the router, a shared expert's gate)."""
        return (self.router,) + ((self.shared_gate,) if self.shared_gate else ())


class ExpertMLP(nn.Module):
    """One expert as plain linears: down(act(gate(x)) * up(x)); the linears are set by `linearize_experts`."""

    def __init__(self, act_fn: nn.Module, roles: tuple[str, str, str]) -> None:
        super().__init__()
        self.act_fn = act_fn
        self.roles = roles

    def forward(self, x: Tensor) -> Tensor:
        gate, up, down = (getattr(self, name) for name in self.roles)
        return down(self.act_fn(gate(x)) * up(x))


class LinearExperts(nn.ModuleList):
    """The experts of one sparse block as a list of `ExpertMLP`s, called like transformers' fused experts module:
    `(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`, the routed experts' outputs weighted and
    summed per token. An expert no token picked is not called (its linears' hooks do not fire), as in the eager
    reference."""

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        for index, expert in enumerate(self):
            token, slot = torch.where(top_k_index == index)
            if token.numel() == 0:
                continue
            routed = expert(hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, routed.to(out.dtype))
        return out


def _linear(weight: Tensor, requires_grad: bool) -> nn.Linear:
    """An nn.Linear holding `weight` [out, in] (built on meta so nothing is initialised twice)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=requires_grad)
    return linear


def linearize_experts(block: nn.Module, spec: ExpertsSpec) -> LinearExperts | None:
    """Replace the block's fused experts by an equivalent `LinearExperts` (once); None for a dense block.

    Exact: every per-expert weight is a copy of its rows of the fused parameter. Works on the meta device too (a
    skeleton built for loading a packed checkpoint).
    """
    try:
        fused = block.get_submodule(spec.path)
    except AttributeError:
        return None  # a dense block of a sparse family (Qwen3-MoE's mlp_only_layers)
    if isinstance(fused, LinearExperts):
        return fused
    tensors = {}
    for param in spec.params:
        value = getattr(fused, param.fused, None)
        if not isinstance(value, Tensor) or value.dim() != 3:
            raise LowbitError(
                f"{spec.path}.{param.fused} is not a fused 3-D expert parameter ({type(fused).__name__}); this "
                "checkpoint's MoE layout is not supported: open an issue with its config.json"
            )
        tensors[param.fused] = value
    count = next(iter(tensors.values())).shape[0]
    act_fn = getattr(fused, "act_fn", None)
    if act_fn is None:
        raise LowbitError(f"{spec.path} ({type(fused).__name__}) has no act_fn: cannot build its per-expert MLPs")
    experts = []
    for index in range(count):
        expert = ExpertMLP(act_fn, (spec.gate, spec.up, spec.down))
        for param in spec.params:
            value = tensors[param.fused]
            weight = value[index].T if param.transposed else value[index]
            if weight.shape[0] % len(param.parts):
                raise LowbitError(f"{spec.path}.{param.fused} rows {weight.shape[0]} do not split into {param.parts}")
            for name, rows in zip(param.parts, weight.chunk(len(param.parts), dim=0), strict=True):
                expert.add_module(name, _linear(rows, value.requires_grad))
        experts.append(expert)
    linear = LinearExperts(experts)
    block.set_submodule(spec.path, linear)
    return linear


def expert_count(block: nn.Module, spec: ExpertsSpec) -> int:
    """The number of experts of a sparse block (0 for a dense block), fused or already linearized."""
    try:
        experts = block.get_submodule(spec.path)
    except AttributeError:
        return 0
    if isinstance(experts, LinearExperts):
        return len(experts)
    return int(getattr(experts, spec.params[0].fused).shape[0])
