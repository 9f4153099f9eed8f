"""Where the block loop gets its blocks and where a finished block goes, when the model does not live in memory.

A resident run needs neither: its blocks are in the model and its records are kept until the export. A streamed
run reads each block from the checkpoint when the loop reaches it (`BlockSource`, backed by `skeleton.StreamedModel`)
and hands each finished block to a `BlockSink` (the streamed export writes its tensors to the shard writer) before
the block is dropped back to the meta device, so memory holds one block, not the model.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from lowbit.engine.offload import Chain, ChainStore
from lowbit.engine.skeleton import StreamedModel, persistent_tensors, set_tensor
from lowbit.quantizer import QuantizedWeight


class BlockSource(Protocol):
    """Blocks read on demand."""

    def materialize(self, index: int) -> nn.Module:
        """Block `index` with real tensors at the compute precision."""

    def placeholder(self, index: int) -> nn.Module:
        """Block `index` with zero tensors: for forwards whose outputs are thrown away (capturing kwargs)."""

    def release(self, index: int) -> None:
        """Drop block `index`'s tensors (back to meta)."""


class BlockSink(Protocol):
    """Takes each finished block (its final weights and quantized records) before the block is released, and keeps
    what a resumed run needs: `done` blocks finished before, each `restore`d without running, then the `chains`."""

    done: int

    def add_outside(self, records: dict[str, QuantizedWeight]) -> None:
        """Records of matrices outside the blocks (a GGUF scheme's embedding/output), before the first block."""

    def add_block(self, index: int, prefix: str, block: nn.Module, records: dict[str, QuantizedWeight]) -> None:
        """`records` are keyed by full module name."""

    def block_done(
        self, index: int, chains: dict[str, Chain], artifacts: dict[str, torch.Tensor], metrics: dict
    ) -> None:
        """Block `index` is final, and `chains` are the inputs of the next block."""

    def restore(self, index: int) -> Any:
        """A block finished by an interrupted run: `.records` (codes on meta), `.artifacts`, `.metrics`."""

    def chains(self, index: int, store: ChainStore) -> dict[str, Chain]:
        """The chains saved after finished block `index`, read into `store`: "q" (quantized), "fp" (float) when
        used."""


class BlockObserver(Protocol):
    """Follows the block loop without changing it (a streamed run's evaluation): sees every block as read and
    with its final weights, and keeps chains of its own that are checkpointed with the loop's."""

    def begin(self) -> None:
        """Before the first block, on the prepared model (MoE experts split): capture what the blocks are fed."""

    def float_block(self, index: int, block: nn.Module) -> None:
        """Block `index` as read, before any stage."""

    def final_block(self, index: int, block: nn.Module) -> None:
        """Block `index` with its final weights (under the scheme's activation quantizers)."""

    def chains(self) -> dict[str, torch.Tensor]:
        """The observer's chains after the last block it saw."""

    def restore(self, chains: dict[str, torch.Tensor]) -> None:
        """Continue from `chains` saved by an interrupted run (a superset of `chains()`'s keys)."""


class CheckpointBlocks:
    """A `BlockSource` over a streamed checkpoint."""

    def __init__(self, streamed: StreamedModel) -> None:
        self.streamed = streamed

    def materialize(self, index: int) -> nn.Module:
        return self.streamed.materialize_block(index)

    def placeholder(self, index: int) -> nn.Module:
        block = self.streamed.blocks[index]
        for name, tensor in persistent_tensors(block):
            if tensor.is_meta:
                set_tensor(block, name, torch.zeros(tensor.shape, dtype=tensor.dtype))
        return block

    def release(self, index: int) -> None:
        self.streamed.release_block(index)
        return_freed_memory()


class DiscardingSink:
    """The `BlockSink` of a data-parallel streamed run's ranks other than 0: rank 0 writes the export, these keep
    nothing (and, with no checkpoints in such a run, are never asked to restore)."""

    done = 0

    def add_outside(self, records: dict[str, QuantizedWeight]) -> None:
        """Nothing to write: rank 0 writes them."""

    def add_block(self, index: int, prefix: str, block: nn.Module, records: dict[str, QuantizedWeight]) -> None:
        """Nothing to write: rank 0 writes the block."""

    def block_done(
        self, index: int, chains: dict[str, Chain], artifacts: dict[str, torch.Tensor], metrics: dict
    ) -> None:
        """Nothing to checkpoint."""

    def restore(self, index: int) -> Any:
        raise RuntimeError("a data-parallel streamed run has no checkpoints to restore from")

    def chains(self, index: int, store: ChainStore) -> dict[str, Chain]:
        raise RuntimeError("a data-parallel streamed run has no checkpoints to restore from")


@functools.cache
def _glibc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim; a no-op elsewhere).

    Why: glibc raises its mmap threshold after large frees, so later block-sized tensors come from the heap, whose
    freed pages it keeps; without this, a streamed run's resident memory grows by about a block per block read
    (measured: 32 x 50 MB blocks read and released, 403 -> 1479 MB; 402 MB after a trim)."""
    trim = _glibc_trim()
    if trim is not None:
        trim(0)


def without_codes(record: QuantizedWeight) -> QuantizedWeight:
    """`record` with its codes, scales and zeros on the meta device: the shapes, scheme and act-order map an export's
    config and its final validation read, without the ~1.06 bytes per weight (W4G128) a streamed run must not keep;
    the checks that read values ran when the block finished (`export.validate.check_block_records`)."""
    return dataclasses.replace(record, codes=_meta(record.codes), scale=_meta(record.scale), zero=_meta(record.zero))


def _meta(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
