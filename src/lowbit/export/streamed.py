"""The export of a streamed run, written while the block loop runs: the engine's `BlockSink` for exports.

Each finished block is checked (valid records, weights equal to them: what `validate_export` checks per record),
turned into its export tensors by the same `block_export_tensors` a resident export uses, and handed to the shard
writer; then the block loop releases it. What lies outside the blocks, the config and the run record are written
by `QuantizedModel.finish_streamed` at the end, so a streamed export has the same bytes as a resident one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lowbit.engine.offload import Chain, ChainStore
from lowbit.engine.stream_checkpoint import StreamCheckpoint, StreamedBlock
from lowbit.export.blocks import ExportContext
from lowbit.export.blocks import block_export_tensors as export_tensors
from lowbit.export.shards import ShardWriter
from lowbit.export.validate import check_block_records
from lowbit.quantizer import QuantizedWeight

log = logging.getLogger(__name__)


class StreamedExport:
    """Writes each finished block of a streamed run into `directory` (an atomic output directory) as `fmt`."""

    def __init__(
        self,
        directory: Path,
        fmt: str,
        model: nn.Module,
        *,
        max_shard_bytes: int,
        act_bits: int = 16,
        ct_packing: str | None = None,
        packer: str = "lowbit",
        checkpoint: StreamCheckpoint | None = None,
    ) -> None:
        self.directory, self.fmt = Path(directory), fmt
        dtype = model.get_input_embeddings().weight.dtype  # the plan's dtype: compressed-tensors scales use it
        self.context = ExportContext(fmt, model, dtype, ct_packing or "dense", packer, act_bits)
        self.checkpoint = checkpoint
        self.done = checkpoint.finished() if checkpoint is not None else 0
        if self.done:  # resume: the writer as it was after the last finished block
            state = checkpoint.load(self.done - 1).writer_state
            self.writer = ShardWriter.restore(self.directory, max_shard_bytes, state, sync=True)
        else:
            self.writer = ShardWriter(self.directory, max_shard_bytes, sync=checkpoint is not None,
                                      keep_merged=checkpoint is not None)  # fmt: skip
        self._records: dict[str, QuantizedWeight] = {}

    def add_outside(self, records: dict[str, QuantizedWeight]) -> None:
        """Nothing to pack: these formats store the rounded embedding/output as float, from the model at the end."""

    def add_block(self, index: int, prefix: str, block: nn.Module, records: dict[str, QuantizedWeight]) -> None:
        """Check block `index`'s records against its weights and write its export tensors."""
        if self.fmt != "fake":
            check_block_records(block, prefix, records, self.fmt, self.context.dtype)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.writer.add_block(export_tensors(self.context, prefix, records, block))
        self._records = records
        log.debug("block %d written to the %s export", index, self.fmt)

    def block_done(
        self, index: int, chains: dict[str, Chain], artifacts: dict[str, Tensor], metrics: dict[str, Any]
    ) -> None:
        """Block `index` and the chain after it are final: checkpoint them (a resumable run) and forget them."""
        if self.checkpoint is not None:
            from lowbit.engine.streaming import without_codes

            records = {name: without_codes(record) for name, record in self._records.items()}
            self.checkpoint.save(index, records, artifacts, metrics, chains, self.writer.state())
            self.writer.drop_merged()
        self._records = {}

    def restore(self, index: int) -> StreamedBlock:
        """Finished block `index` of an interrupted run (records without codes, artifacts, metrics)."""
        assert self.checkpoint is not None
        return self.checkpoint.load(index)

    def chains(self, index: int, store: ChainStore) -> dict[str, Chain]:
        """The block inputs saved after finished block `index`, read into `store`."""
        assert self.checkpoint is not None
        return self.checkpoint.chains(index, store)
