"""OmniQuant's Learnable Equivalent Transformation (docs/methods.md, OmniQuant): per-channel scales (and shifts) on the
norm->q/k/v, v->o and norm->gate/up pairs, plus q<->k scaling, applied as a pure function of the block's parameters.

The same function forms the temporary weights during training and the folded weights at the end, so the exported
block computes, bit for bit, what was trained. Shifts exist only where the previous norm and every consumer linear
have a bias (OPT), and only when the recipe asks for them (activation quantization).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowbit.arch import ArchSpec, ScaleGroup
from lowbit.distributed.group import Group
from lowbit.engine.context import call_block
from lowbit.errors import LowbitError

SCALE_MIN = 1e-2  # the reference's truncate_number floor (avoids AMP overflow)
INIT_FLOOR = 1e-5


@dataclass
class LetPair:
    """One equivalence pair: `scale` (and `shift`) on the inputs of `group.linears`, absorbed by `group.prev`."""

    group: ScaleGroup
    scale: nn.Parameter
    shift: nn.Parameter | None = None
    rows: slice | None = None  # the rows of a fused prev linear that absorb the scales (ArchSpec.prev_rows)

    @property
    def name(self) -> str:
        return self.group.prev

    def parameters(self) -> list[nn.Parameter]:
        return [self.scale] if self.shift is None else [self.scale, self.shift]


@dataclass
class QKScale:
    """q<->k scaling: q rows divided, k rows multiplied by the same per-row scale (q.k^T unchanged).

    The parameter lives per k row (n_kv_heads * head_dim), repeated for the q heads of each KV group (GQA). With
    `tied`, one value serves each rotary pair (i, i + head_dim/2), which keeps the pair exact under RoPE.
    """

    q: str
    k: str
    scale: nn.Parameter
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    def k_rows(self) -> Tensor:
        s = self.scale.reshape(self.kv_heads, -1)
        return (torch.cat([s, s], dim=1) if self.tied else s).reshape(-1)

    def q_rows(self) -> Tensor:
        per_kv = self.k_rows().reshape(self.kv_heads, self.head_dim)
        return per_kv.repeat_interleave(self.heads // self.kv_heads, dim=0).reshape(-1)


@torch.no_grad()
def truncate_scales(scales: list[Tensor]) -> None:
    """|s| < 1e-2 -> sign(s) * 1e-2, in place before every use (reference `truncate_number`)."""
    for s in scales:
        small = s.abs() < SCALE_MIN
        s[small] = s[small].sign() * SCALE_MIN


def let_groups(arch: ArchSpec, block: nn.Module) -> list[ScaleGroup]:
    """OmniQuant's pairs: the exact scale groups except the FFN's expand->contract one (the reference has none)."""
    return [group for group in arch.groups_for(block) if group.prev not in arch.ffn.expand]


def _has_bias(block: nn.Module, name: str) -> bool:
    return getattr(block.get_submodule(name), "bias", None) is not None


def shift_possible(block: nn.Module, group: ScaleGroup) -> bool:
    """A shift needs a bias on the previous op and on every consumer (an RMSNorm/bias-free linear has none)."""
    return _has_bias(block, group.prev) and all(_has_bias(block, name) for name in group.linears)


@torch.no_grad()
def activation_stats(
    block: nn.Module,
    names: list[str],
    inputs: Tensor,
    kwargs: dict,
    device: torch.device,
    group: Group | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per input channel of each named linear: max |x| over all tokens, and the shift (max + min)/2 as the
    reference's running average 0.99 * old + 0.01 * new over samples (generate_act_scale_shift.py).

    On several ranks (`group`) each rank measures its samples and every rank folds all of them in global sample
    order: the running average is not a sum, so one process's order gives one process's statistics, bit for bit."""
    seen: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in names}  # per call, in sample order

    def hook(name: str):
        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            lo, hi = torch.aminmax(x, dim=0)
            seen[name].append((x.abs().amax(dim=0), (hi + lo) / 2))

        return record

    handles = [block.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
    try:
        for j in range(inputs.shape[0]):
            call_block(block, inputs[j : j + 1].to(device), kwargs)
    finally:
        for handle in handles:
            handle.remove()
    if group is not None and group.distributed:
        mine = {name: [(a.cpu(), m.cpu()) for a, m in values] for name, values in seen.items()}
        ranks = group.gather_objects(mine)
        seen = {name: [item for rank in ranks for item in rank[name]] for name in names}
    stats = {}
    for name, values in seen.items():
        amax, shift = values[0]
        for new_amax, middle in values[1:]:
            amax, shift = torch.maximum(amax, new_amax), 0.99 * shift + 0.01 * middle
        stats[name] = (amax.cpu(), shift.cpu())
    return stats


def initial_scale(act_max: Tensor, weight: Tensor, alpha: float) -> Tensor:
    """s = clamp(act_max^alpha / wmax^(1 - alpha), min 1e-5), wmax over the key linear's output rows."""
    wmax = weight.detach().float().abs().amax(dim=0).clamp(min=INIT_FLOOR)
    return (act_max.float().clamp(min=INIT_FLOOR).pow(alpha) / wmax.pow(1 - alpha)).clamp(min=INIT_FLOOR)


def make_qk_scale(arch: ArchSpec, block: nn.Module, tying: str) -> QKScale | None:
    """The q<->k scale of a block, initialised to 1 (None when the family declares no q/k pair, or when q_norm/k_norm
    after the projections make q<->k scaling no equivalence: Qwen3, Gemma 3)."""
    if not arch.query_key_scalable:
        return None
    q_name, k_name = arch.query_key
    attention = block.get_submodule(q_name.rpartition(".")[0])
    head_dim = int(getattr(attention, "head_dim", 0))
    q_rows, k_rows = block.get_submodule(q_name).out_features, block.get_submodule(k_name).out_features
    if head_dim <= 0 or q_rows % head_dim or k_rows % head_dim:
        raise LowbitError(f"cannot read the head layout of {q_name}/{k_name}; LET's q<->k pair needs head_dim")
    tied = arch.rotary and tying == "rotary"
    size = k_rows // 2 if tied else k_rows
    scale = nn.Parameter(torch.ones(size))
    return QKScale(q_name, k_name, scale, q_rows // head_dim, k_rows // head_dim, head_dim, tied)


def _divide_part(t: Tensor, s: Tensor, part: slice | None) -> Tensor:
    """t / s on the rows `part` of a fused linear (all of t when None), differentiable."""
    return t / s if part is None else torch.cat([t[: part.start], t[part] / s, t[part.stop :]])


def _divide_prev(
    params: dict[str, Tensor],
    prev: str,
    shift: Tensor | None,
    s: Tensor,
    source: str,
    rows: bool,
    part: slice | None = None,
    offset: float = 0.0,
) -> None:
    """prev's weight (rows, or the last axis for a norm/the quirk) and bias divided by s, the bias shifted first.

    A norm computing x * (offset + w) (Gemma: offset 1) takes (offset + w) / s - offset."""
    weight = params[f"{source}{prev}.weight"]
    if rows:
        params[f"{prev}.weight"] = _divide_part(weight, s[:, None], part)
    else:
        params[f"{prev}.weight"] = (weight + offset) / s - offset if offset else weight / s
    if f"{prev}.bias" in params:
        bias = params[f"{source}{prev}.bias"]
        params[f"{prev}.bias"] = _divide_part((bias - shift) if shift is not None else bias, s, part)


def _scale_consumers(params: dict[str, Tensor], pair: LetPair, s: Tensor) -> None:
    """Each consumer: b <- b + W.delta with the weight before scaling, then W <- W.diag(s)."""
    for name in pair.group.linears:
        weight = params[f"{name}.weight"]
        if pair.shift is not None:
            params[f"{name}.bias"] = params[f"{name}.bias"] + weight @ pair.shift
        params[f"{name}.weight"] = weight * s[None, :]


def apply_let(
    params: Mapping[str, Tensor],
    pairs: list[LetPair],
    qk: QKScale | None,
    reference_quirk: bool = False,
    norm_offset: float = 0.0,
) -> dict[str, Tensor]:
    """The transformed block parameters, in the reference's order: norm pairs, linear pairs (v->o), then q<->k.

    `params` maps block parameter names (norm weight/bias, linear weight/bias) to fp32 tensors; the result is a
    new dict (inputs untouched), differentiable w.r.t. the scales, shifts and the input tensors.
    """
    out = dict(params)
    if reference_quirk:
        out.update({f"_original.{k}": v for k, v in params.items()})
    for pair in pairs:
        if pair.group.prev_kind == "norm":
            _divide_prev(out, pair.group.prev, pair.shift, pair.scale, "", rows=False, offset=norm_offset)
            _scale_consumers(out, pair, pair.scale)
    for pair in pairs:  # v -> o; the OPT reference quirk treats v_proj as a norm on its original weight
        if pair.group.prev_kind == "linear":
            source = "_original." if reference_quirk else ""
            _divide_prev(out, pair.group.prev, pair.shift, pair.scale, source, rows=not reference_quirk, part=pair.rows)
            _scale_consumers(out, pair, pair.scale)
    if qk is not None:
        s_q, s_k = qk.q_rows(), qk.k_rows()
        out[f"{qk.q}.weight"] = out[f"{qk.q}.weight"] / s_q[:, None]
        out[f"{qk.k}.weight"] = out[f"{qk.k}.weight"] * s_k[:, None]
        if f"{qk.q}.bias" in out:
            out[f"{qk.q}.bias"] = out[f"{qk.q}.bias"] / s_q
        if f"{qk.k}.bias" in out:
            out[f"{qk.k}.bias"] = out[f"{qk.k}.bias"] * s_k
    return {k: v for k, v in out.items() if not k.startswith("_original.")}
