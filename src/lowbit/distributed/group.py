"""The process group a run is passed explicitly: rank, world size, and reductions in a fixed rank order."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def shard_bounds(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank `rank`'s contiguous slice of `total` items in order; the first `total % world_size`
    ranks hold one more, so every item is held by exactly one rank."""
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def local_indices(index: Tensor, start: int, count: int) -> Tensor:
    """The global sample indices `index` that fall into the `count` samples a rank holds from `start`, as indices
    into its own slice (in `index`'s order)."""
    return index[(index >= start) & (index < start + count)] - start


@dataclass(frozen=True)
class Group:
    """One rank of a data-parallel run (default: the single process, with no torch.distributed at all).

    Reductions gather every rank's tensor to every rank and sum them in rank order, never with an all-reduce whose
    order the backend picks: two runs with the same ranks then reduce bit for bit alike. `timeout_s` bounds each
    collective (a rank that died ends the others instead of hanging them).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "gloo" | "nccl"; None for the single process
    timeout_s: float = 600.0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, writes the export, the run record and the checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def device(self) -> torch.device:
        """Where the backend's collectives take tensors (NCCL: this rank's GPU)."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    @property
    def timeout(self) -> timedelta:
        return timedelta(seconds=self.timeout_s)

    def shard(self, total: int) -> slice:
        """This rank's contiguous slice of `total` items (calibration windows, evaluation windows)."""
        return slice(*shard_bounds(total, self.rank, self.world_size))

    def offset(self, count: int) -> tuple[int, int]:
        """Where this rank's `count` items start among all ranks' (in rank order, as `shard` cuts them), and their
        total: the global indices of what a rank holds (one collective)."""
        if not self.distributed:
            return 0, count
        counts = self.gather_objects(count)
        return sum(counts[: self.rank]), sum(counts)

    def gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's `tensor` (same shape and dtype on every rank), in rank order, on `tensor`'s device."""
        if not self.distributed:
            return [tensor]
        import torch.distributed as dist

        local = tensor.detach().to(self.device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return [part.to(tensor.device) for part in parts]

    def sum(self, tensor: Tensor) -> Tensor:
        """The sum over ranks of `tensor`, added in rank order in its own dtype (deterministic)."""
        if not self.distributed:
            return tensor
        parts = self.gather(tensor)
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return total

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's picklable `value`, in rank order."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def broadcast_object(self, value: Any, src: int = 0) -> Any:
        """Rank `src`'s picklable `value` on every rank."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Leave the process group (a no-op for the single process)."""
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
