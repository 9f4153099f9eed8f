"""Capture what the decoder blocks receive: block 0's hidden states for every calibration sample, and each block's
own call kwargs (attention mask, position ids, rotary embeddings).

Families with alternating sliding-window / global attention (Gemma 2/3) or per-layer rotary give each layer
different kwargs, so replaying block i with block 0's kwargs would be wrong. A first pass of one sample therefore
runs through every block with pre-hooks on all of them (one sample: the kwargs are recorded per sample anyway, and a
whole batch through every block costs a full model forward); then every batch stops at block 0. Kwargs equal across
blocks share one object, so memory grows only with the number of distinct layer types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lowbit.arch import ArchSpec
from lowbit.engine.offload import Chain, ChainStore
from lowbit.errors import LowbitError

if TYPE_CHECKING:
    from lowbit.engine.streaming import BlockSource


class _StopForward(Exception):
    """Raised by a capture hook: nothing after the last block that needs recording has to run."""


@dataclass
class BlockInputs:
    """Inputs of block 0: hidden states [n, L, h] on CPU (a chain: engine/offload.py), and the kwargs each block is
    called with.

    The kwargs are captured from a batch of one sample and broadcast over any batch size, so replay can batch
    freely. `per_block[i]` is block i's kwargs; equal values are the same objects across blocks.
    """

    hidden: Chain
    per_block: list[dict[str, Any]]

    @property
    def kwargs(self) -> dict[str, Any]:
        """Block 0's kwargs (use `kwargs_for(i)` when replaying block i)."""
        return self.per_block[0]

    def kwargs_for(self, index: int) -> dict[str, Any]:
        """The kwargs block `index` was called with in the model's own forward."""
        return self.per_block[index]


def _batch_one(value: Any) -> Any:
    """Keep only the first sample of batch-shaped kwargs so they broadcast over any batch size."""
    if isinstance(value, torch.Tensor):
        return value[:1].detach() if value.dim() > 0 and value.shape[0] > 1 else value.detach()
    if isinstance(value, tuple):
        return tuple(_batch_one(v) for v in value)
    return value


def _same(a: Any, b: Any) -> bool:
    """Exact equality of captured kwarg values (tensors by dtype, shape and content; tuples elementwise)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.device == b.device
            and bool(torch.equal(a, b))
        )
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a usable ==: treat as distinct
        return a is b


def _shared(value: Any, seen: list[Any]) -> Any:
    """`value`, or an equal object recorded before (so equal kwargs of different blocks share storage)."""
    for known in seen:
        if _same(value, known):
            return known
    seen.append(value)
    return value


_DROPPED_KWARGS = ("past_key_values", "past_key_value", "cache", "use_cache", "output_attentions")


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    arch: ArchSpec,
    input_ids: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device,
    source: BlockSource | None = None,
    chains: ChainStore | None = None,
) -> BlockInputs:
    """Run the model up to block 0 for every sample and record block 0's inputs and every block's kwargs.

    Calibration windows are full length without padding, so one kwargs set per block serves every sample. With a
    `source` (a streamed model, blocks on meta), the kwargs pass runs each block on zero placeholders, one at a
    time: what a block is called with does not depend on the blocks before it, and nothing is read from disk.
    The hidden states go batch by batch into one chain of `chains` (default: in RAM).
    """
    chains = ChainStore() if chains is None else chains
    blocks = arch.blocks(model)
    hidden: Chain | None = None
    captured: list[torch.Tensor] = []  # the batch the hook stopped at
    per_block: list[dict[str, Any] | None] = [None] * len(blocks)
    distinct: dict[str, list[Any]] = {}

    def hook_for(index: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            if state["kwargs_pass"]:
                per_block[index] = {
                    key: _shared(_batch_one(value), distinct.setdefault(key, []))
                    for key, value in kwargs.items()
                    if key != "hidden_states" and key not in _DROPPED_KWARGS
                }
                if index == len(blocks) - 1:
                    raise _StopForward
                if source is not None:
                    source.placeholder(index)
                return
            value = args[0] if args else kwargs["hidden_states"]
            captured.append(value.detach().to("cpu", torch.float32))
            raise _StopForward

        return hook

    handles = [block.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, block in enumerate(blocks)]
    if source is not None:
        handles += [block.register_forward_hook(lambda *_, i=i: source.release(i)) for i, block in enumerate(blocks)]
    state = {"kwargs_pass": True}
    try:
        _forward_to_hook(model, input_ids[:1].to(device))
        state["kwargs_pass"] = False
        missing = [i for i, kwargs in enumerate(per_block) if kwargs is None]
        if missing:
            raise LowbitError(f"blocks {missing} were never called in the forward: the ArchSpec's blocks_path is wrong")
        total = input_ids.shape[0]
        for start in range(0, total, batch_size):
            _forward_to_hook(model, input_ids[start : start + batch_size].to(device))
            rows = captured.pop()
            if not torch.isfinite(rows).all():
                raise LowbitError("the model's embeddings produce NaN/Inf; check the checkpoint or load it in float32")
            if hidden is None:
                hidden = chains.new((total, *rows.shape[1:]))
            hidden[start : start + rows.shape[0]] = rows
    finally:
        for handle in handles:
            handle.remove()
    if hidden is None:
        raise LowbitError("no calibration samples to capture")
    return BlockInputs(hidden=hidden, per_block=per_block)


def _forward_to_hook(model: nn.Module, batch: torch.Tensor) -> None:
    """Run the model until a capture hook stops it; a forward that ends without stopping missed the blocks."""
    try:
        model(input_ids=batch, use_cache=False)
    except _StopForward:
        return
    raise LowbitError("capture hook never fired: the ArchSpec's blocks are not on the forward path")
