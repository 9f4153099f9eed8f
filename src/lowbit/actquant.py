"""Activation quantization of weight-activation schemes (docs/methods.md, OmniQuant).

Dynamic per-token asymmetric fake quantization (`quantize_activation`, STE rounding) is applied at exactly the
points OmniQuant's reference code quantizes:

- the input of every block linear (`ArchSpec.linear_names_for`). Linears fed the same tensor (q/k/v, gate/up) share
  one quantization of it (docs/methods.md, OmniQuant decision);
- the attention matmul operands: per (head, token) over head_dim with q and k after RoPE (LLaMA-like,
  `attention_operands="head"`), or per token across all heads with q after its 1/sqrt(d) scaling (OPT, "token").
  The softmax output P is not quantized and the softmax runs in fp32.

Linear inputs are rewritten by forward pre-hooks. The attention operands are reached through transformers'
`AttentionInterface`: every Llama/OPT attention module looks its attention function up by
`self.config._attn_implementation` on each call, so each patched attention module gets a shallow copy of the
config naming `lowbit_act_quant` (registered on first use). Only the modules under `root` change; the model's
own config, the other blocks and the attention masks the model builds are untouched, and removal puts the original
config object back. Everything lives on the modules, so it works under `torch.func.functional_call`, on a single
block called with the engine's captured kwargs, and on the whole model (perplexity, generate).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lowbit.arch import ArchSpec
from lowbit.errors import LowbitError
from lowbit.quantizer import SCALE_FLOOR, round_ste

log = logging.getLogger(__name__)

ACT_SCALE_CAP = 1e4

ACT_KIND = "per-token asym dynamic"
ATTENTION_NAME = "lowbit_act_quant"
OPERAND_LAYOUTS = ("head", "token")
_STATE = "_lowbit_act_quant"  # attribute holding an attention module's _AttentionState while installed
# attention implementations whose masks _attend understands (the engine's chunked kernel gets sdpa's)
_DELEGATES = ("eager", "sdpa", "lowbit_chunked_causal", None)

# observer(point, shared): called each time a quantized tensor is consumed. `point` is the consuming linear's name
# (relative to root) or "<attention>.query|key|value"; `shared` is True when a linear reused the quantization made
# for the previous linear of the same input tensor. Used by the census test (every quantized tensor exactly once).
Observer = Callable[[str, bool], None]


def quantize_activation(x: Tensor, bits: int) -> Tensor:
    """Dynamic per-token asymmetric fake quant over the last dim, STE rounding; bits >= 16 is identity.

    Qparams are recomputed on every call; math is fp32 and the result is cast back to x's dtype.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
        raise LowbitError(f"activation bits={bits!r} is not valid: use an integer >= 1 (16 or more disables it)")
    if bits >= 16:
        return x
    qmax = 2**bits - 1
    x32 = x.float()
    lo, hi = torch.aminmax(x32, dim=-1, keepdim=True)
    scale = ((hi - lo) / qmax).clamp(SCALE_FLOOR, ACT_SCALE_CAP)
    zero = torch.round((-lo / scale).clamp(-ACT_SCALE_CAP, ACT_SCALE_CAP))
    codes = (round_ste(x32 / scale) + zero).clamp(0, qmax)
    return (scale * (codes - zero)).to(x.dtype)


def activation_record(bits: int) -> dict[str, Any] | None:
    """What the run record and exports say about the activations; None when they stay in float."""
    if bits >= 16:
        return None
    return {"bits": bits, "kind": ACT_KIND}


@dataclass
class _AttentionState:
    bits: int
    layout: str
    point: str
    observer: Observer | None
    config: Any  # the attention module's own config object, put back on removal


def _quantize_operand(x: Tensor, state: _AttentionState, which: str) -> Tensor:
    """x is [batch, heads, tokens, head_dim]; quantize per (head, token), or per token across all heads."""
    if state.observer is not None:
        state.observer(f"{state.point}.{which}", False)
    if state.layout == "head":
        return quantize_activation(x, state.bits)
    b, h, n, d = x.shape
    flat = x.transpose(1, 2).reshape(b, n, h * d)
    return quantize_activation(flat, state.bits).reshape(b, n, h, d).transpose(1, 2)


def _attend(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None,
    dropout: float,
) -> tuple[Tensor, Tensor]:
    """Eager attention with the softmax in fp32, for the masks eager and sdpa attention receive.

    A None mask means sdpa's implicit causal mask (transformers drops it when there is no padding).
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: the same per-row operands, repeated (transformers' repeat_kv)
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is None:
        if q_len > 1 and getattr(module, "is_causal", True):
            causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=scores.device).tril(kv_len - q_len)
            scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :kv_len], torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask[..., :kv_len]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)  # P: never quantized
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def lowbit_act_quant_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **_kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """The attention function transformers calls on a patched module: quantize q, k, v, then attend (fp32 softmax)."""
    state = getattr(module, _STATE, None)
    if state is None:
        raise RuntimeError(f"{ATTENTION_NAME} called on a module without activation quantization installed")
    query = _quantize_operand(query, state, "query")
    key = _quantize_operand(key, state, "key")
    value = _quantize_operand(value, state, "value")
    return _attend(module, query, key, value, attention_mask, scaling, dropout)


def _register_attention() -> None:
    """Make `lowbit_act_quant` a known attention implementation (idempotent).

    Done on first use: importing transformers' modeling utilities costs seconds that `lowbit recipes` and the early
    refusals should not pay.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, lowbit_act_quant_attention)


@dataclass
class _SharedInput:
    """The last linear input of a block and its quantization: linears fed the same tensor share one."""

    bits: int
    observer: Observer | None
    seen: Tensor | None = None
    quantized: Tensor | None = None

    def hook(self, point: str) -> Callable:
        def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                x, rest = args[0], args[1:]
            else:
                x, rest = kwargs.pop("input"), ()
            shared = self.seen is x  # identity: the slot holds a reference, so the id cannot be reused
            if not shared:
                self.seen, self.quantized = x, quantize_activation(x, self.bits)
            if self.observer is not None:
                self.observer(point, shared)
            return (self.quantized, *rest), kwargs

        return pre_hook

    def clear(self, *_args: Any) -> None:
        self.seen = self.quantized = None


@dataclass
class ActQuantHandle:
    """Installed activation quantizers of a model or block; `remove()` restores it exactly (idempotent)."""

    bits: int
    _hooks: list[RemovableHandle] = field(default_factory=list)
    _attentions: list[nn.Module] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return bool(self._hooks or self._attentions)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        for attention in self._attentions:
            state = getattr(attention, _STATE, None)
            if state is not None:
                attention.config = state.config
                delattr(attention, _STATE)
        self._hooks.clear()
        self._attentions.clear()


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 2:
        raise LowbitError(f"activation bits={bits!r} is not valid: use 2 to 8 (16 or more keeps activations in float)")


def _blocks(root: nn.Module, arch: ArchSpec) -> list[tuple[str, nn.Module]]:
    """(name prefix, block) for a whole model, or [("", root)] when root is one decoder block."""
    try:
        blocks = arch.blocks(root)
    except AttributeError:
        blocks = None
    if blocks is None:
        return [("", root)]
    return [(f"{arch.block_name(index)}.", block) for index, block in enumerate(blocks)]


def _submodule(block: nn.Module, name: str, arch: ArchSpec) -> nn.Module:
    try:
        return block.get_submodule(name)
    except AttributeError:
        raise LowbitError(
            f"no '{name}' in the module given for activation quantization: pass a {arch.family} model or one of "
            "its decoder blocks"
        ) from None


def installed_act_bits(root: nn.Module, arch: ArchSpec) -> int:
    """The activation bits installed on `root` (16 when none), so evaluation can tell W-A from weight-only."""
    found = set()
    for _prefix, block in _blocks(root, arch):
        with contextlib.suppress(AttributeError):
            state = getattr(block.get_submodule(arch.attention), _STATE, None)
            found.add(16 if state is None else state.bits)
    if len(found) > 1:
        raise LowbitError("activation quantization is installed on only some blocks: remove it and install it again")
    return found.pop() if found else 16


def act_bits_of(model: nn.Module) -> int:
    """The activation bits installed anywhere in `model` (16 when none); needs no ArchSpec (any evaluated model)."""
    bits = {state.bits for module in model.modules() if (state := getattr(module, _STATE, None)) is not None}
    return min(bits) if bits else 16


def install_activation_quant(
    root: nn.Module, arch: ArchSpec, bits: int, *, observer: Observer | None = None
) -> ActQuantHandle:
    """Quantize `root`'s activations (a whole model or one decoder block) until `handle.remove()`.

    bits >= 16 installs nothing. Installing twice would quantize twice, so it is an error.
    """
    _check_bits(bits)
    handle = ActQuantHandle(bits)
    if bits >= 16:
        return handle
    if arch.attention_operands not in OPERAND_LAYOUTS:
        raise LowbitError(f"ArchSpec {arch.family} has attention_operands={arch.attention_operands!r}: use head/token")
    if installed_act_bits(root, arch) != 16:
        raise LowbitError("activation quantization is already installed on this model: remove its handle first")
    try:
        for prefix, block in _blocks(root, arch):
            slot = _SharedInput(bits, observer)
            arch.prepare_block(block)  # MoE: the experts' inputs are those of their per-expert linears
            for name in arch.linear_names_for(block):
                linear = _submodule(block, name, arch)
                handle._hooks.append(linear.register_forward_pre_hook(slot.hook(prefix + name), with_kwargs=True))
            handle._hooks.append(block.register_forward_hook(slot.clear, always_call=True))
            _patch_attention(_submodule(block, arch.attention, arch), prefix + arch.attention, bits, arch, observer)
            handle._attentions.append(block.get_submodule(arch.attention))
    except BaseException:
        handle.remove()
        raise
    return handle


def _patch_attention(attention: nn.Module, point: str, bits: int, arch: ArchSpec, observer: Observer | None) -> None:
    config = getattr(attention, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise LowbitError(
            f"{point} ({type(attention).__name__}) has no transformers config: activation quantization needs a "
            "transformers attention module that dispatches through AttentionInterface (transformers >= 5)"
        )
    current = config._attn_implementation
    if current not in _DELEGATES:
        raise LowbitError(
            f"{point} uses attn_implementation={current!r}; activation quantization replaces eager/sdpa attention "
            "only: load the model with attn_implementation='sdpa' (the default on CPU)"
        )
    _register_attention()
    patched = copy.copy(config)
    patched._attn_implementation = ATTENTION_NAME
    attention.config = patched
    setattr(attention, _STATE, _AttentionState(bits, arch.attention_operands, point, observer, config))


@contextlib.contextmanager
def activation_quant(
    root: nn.Module, arch: ArchSpec, bits: int, *, observer: Observer | None = None
) -> Iterator[ActQuantHandle]:
    """Quantize `root`'s activations inside the `with` block; everything is restored on exit.

    `root` is a whole model or one decoder block (e.g. the engine's `ctx.block`, also under
    `torch.func.functional_call`). bits >= 16 is a no-op, and so is the same bits already installed (a W-A model
    from `lowbit.quantize`), which is never quantized twice; other bits already installed are an error.
    """
    _check_bits(bits)
    present = installed_act_bits(root, arch) if bits < 16 else 16
    if bits >= 16 or (present == bits and observer is None):
        yield ActQuantHandle(bits if bits < 16 else 16)
        return
    if present != 16:
        raise LowbitError(
            f"{present}-bit activation quantization is installed already; remove it before running with {bits} bits"
        )
    handle = install_activation_quant(root, arch, bits, observer=observer)
    try:
        yield handle
    finally:
        handle.remove()
