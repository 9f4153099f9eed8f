"""Resume for a streamed run: the partial export is the checkpoint, no second copy of any block is kept.

A streamed run's work directory (next to --out, with the manifest of a resident run's) holds:

    export/                         the partial export: closed shards and the group files of the open one
    stream/chain-0003.safetensors   the inputs block 4 needs (the quantized chain; the float chain when used)
    stream/block-0003.safetensors   block 3 is finished: its records without codes (scales, zeros, g_idx, bias),
                                    new artifacts, metrics, and the shard writer's state after its group

A block counts as finished once its block file exists; its group and its chain file were written before it. A
resumed run rebuilds the shard writer from the last state (dropping what the interrupted block wrote), reloads the
chain and goes on with the next block: no block is read or run twice, so the export has the same bytes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lowbit.engine.offload import Chain, ChainStore, load_chains, save_chains
from lowbit.engine.workdir import atomic_save, load_tensors, split_prefix
from lowbit.quantizer import QuantizedWeight
from lowbit.scheme import QuantScheme

_BLOCK = re.compile(r"^block-(\d{4})\.safetensors$")


@dataclass
class StreamedBlock:
    """What a finished streamed block left: its records (codes on meta), new artifacts, metrics, writer state."""

    records: dict[str, QuantizedWeight]
    artifacts: dict[str, Tensor]
    metrics: dict[str, Any]
    writer_state: dict[str, Any]


class StreamCheckpoint:
    """The `stream/` part of a streamed run's work directory; `export_dir` is where its partial export grows."""

    def __init__(self, work_path: Path) -> None:
        self.path = Path(work_path) / "stream"
        self.export_dir = Path(work_path) / "export"

    def finished(self) -> int:
        """How many blocks are finished: 0..k without gaps."""
        if not self.path.is_dir():
            return 0
        found = {int(m.group(1)) for p in self.path.iterdir() if (m := _BLOCK.match(p.name))}
        count = 0
        while count in found:
            count += 1
        return count

    def save(
        self,
        index: int,
        records: dict[str, QuantizedWeight],
        artifacts: dict[str, Tensor],
        metrics: dict[str, Any],
        chains: dict[str, Chain],
        writer_state: dict[str, Any],
    ) -> None:
        """Block `index` is finished (its group already in the export): its chain (written chunk by chunk, also from a
        chain on disk), then its block file."""
        self.path.mkdir(parents=True, exist_ok=True)
        if chains:
            save_chains(chains, self._chain(index))
        tensors: dict[str, Tensor] = {f"art.{key}": value for key, value in artifacts.items()}
        shapes, schemes = {}, {}
        for name, record in records.items():
            state = record.state_dict()
            tensors.update({f"rec.{name}.{key}": value for key, value in state.items() if not value.is_meta})
            shapes[name] = {key: [list(value.shape), str(value.dtype).removeprefix("torch.")]
                            for key, value in state.items() if value.is_meta}  # fmt: skip
            schemes[name] = record.scheme.to_dict()
        meta = {"metrics": json.dumps(metrics, default=str), "shapes": json.dumps(shapes),
                "schemes": json.dumps(schemes), "writer": json.dumps(writer_state)}  # fmt: skip
        atomic_save(tensors, self._block(index), meta)
        if index:
            self._chain(index - 1).unlink(missing_ok=True)

    def load(self, index: int) -> StreamedBlock:
        """Finished block `index` as it was saved."""
        tensors, meta = load_tensors(self._block(index))
        shapes = json.loads(meta["shapes"])
        records = {}
        for name, scheme in json.loads(meta["schemes"]).items():
            state = split_prefix(tensors, f"rec.{name}.")
            for key, (shape, dtype) in shapes[name].items():
                state[key] = torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
            parts = (state["codes"], state["scale"], state["zero"], QuantScheme.from_dict(scheme))
            records[name] = QuantizedWeight(*parts, state.get("g_idx"), state.get("bias"))
        writer = json.loads(meta["writer"])
        return StreamedBlock(records, split_prefix(tensors, "art."), json.loads(meta["metrics"]), writer)

    def chains(self, index: int, store: ChainStore | None = None) -> dict[str, Chain]:
        """The block inputs saved after block `index`, read into `store` (default: RAM); {} for a recipe without
        calibration data."""
        path = self._chain(index)
        return load_chains(path, store or ChainStore()) if path.is_file() else {}

    def _block(self, index: int) -> Path:
        return self.path / f"block-{index:04d}.safetensors"

    def _chain(self, index: int) -> Path:
        return self.path / f"chain-{index:04d}.safetensors"
