"""GGUF export of a streamed run: the file is started before the first block (every tensor info is known from the
shapes and the scheme), each block's tensors are packed, checked and written as the block finishes, and what lies
after the blocks (output norm, untied lm_head) is written at the end. Only one block's packed tensors are in memory.

The engine's `BlockSink` protocol (engine/streaming.py). A GGUF file is one stream, so this sink does not resume
an interrupted run (`done` is always 0; the run refuses --resume with --format gguf when streaming).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from torch import Tensor, nn

from lowbit.arch import arch_for
from lowbit.engine.offload import Chain, ChainStore
from lowbit.errors import LowbitError
from lowbit.export.gguf.arch import gguf_arch
from lowbit.export.gguf.checks import GGUF_FORMAT
from lowbit.export.gguf.embeddings import outside_types
from lowbit.export.gguf.mixes import mix_schemes, type_scheme
from lowbit.export.gguf.tensors import PlannedTensor, expected_values, plan_tensors, tensor_bytes
from lowbit.export.gguf.vocab import build_vocab
from lowbit.export.gguf.writer import PreparedGguf, file_type_of, start_file
from lowbit.formats.files import GGUF_FILE
from lowbit.quantizer import QuantizedWeight
from lowbit.scheme import QuantScheme

log = logging.getLogger(__name__)


class GgufStreamedExport:
    """Writes `model.gguf` into `directory` block by block (see the module docstring)."""

    done = 0
    fmt = GGUF_FORMAT

    def __init__(self, directory: Path, model: nn.Module, tokenizer: Any, scheme: QuantScheme, header: dict) -> None:
        """`model` is the streamed shell (blocks on meta, the rest materialized); `header` holds the "model" and
        "config" entries of the run record, which the file's metadata names."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        arch = gguf_arch(model)
        spec = arch_for(model)
        schemes = mix_schemes(model, spec, scheme) or {
            f"{spec.block_name(i)}.{name}": scheme
            for i, block in enumerate(spec.blocks(model))
            for name in spec.linears(block)
        }
        schemes.update({name: type_scheme(t) for name, t in outside_types(model, scheme).items()})
        tensors = plan_tensors(model, arch, schemes)
        vocab = build_vocab(tokenizer, int(model.config.vocab_size))
        self.prepared = PreparedGguf(model, {}, arch, vocab, tensors, file_type_of(scheme, {}))
        self.path = self.directory / GGUF_FILE
        self.writer = start_file(self.path, self.prepared, header)
        self.next = 0  # index of the next planned tensor to write
        self.outside: dict[str, QuantizedWeight] = {}  # the embedding/output records, once the run has rounded them

    def add_outside(self, records: dict[str, QuantizedWeight]) -> None:
        """The run rounded the embedding (and an untied output): write what precedes the first block."""
        self.outside = dict(records)
        self._write_outside_blocks(self.prepared.model.state_dict())

    def _in_block(self, item: PlannedTensor) -> bool:
        return item.name.startswith("blk.")

    def _write_outside_blocks(self, state: dict[str, Tensor]) -> None:
        """Write planned tensors up to the next block tensor (token_embd first; output_norm / output at the end)."""
        tensors = self.prepared.tensors
        while self.next < len(tensors) and not self._in_block(tensors[self.next]):
            self.writer.write_tensor_data(tensor_bytes(tensors[self.next], state, self.outside, self.prepared.arch))
            self.next += 1

    def add_block(self, index: int, prefix: str, block: nn.Module, records: dict[str, QuantizedWeight]) -> None:
        """Pack, check and write block `index`'s tensors (records keyed by full module name)."""
        state = {f"{prefix}.{key}": value for key, value in block.state_dict().items()}
        tensors, arch = self.prepared.tensors, self.prepared.arch
        first = self.next
        while self.next < len(tensors) and tensors[self.next].source in state:
            item = tensors[self.next]
            data = tensor_bytes(item, state, records, arch)
            if item.quantized:
                decoded = arch.unpermute_rows(item.name, gguf.quants.dequantize(data, item.qtype))
                expected = expected_values(item, state, records, arch)
                evaluated = [state[key].detach().float().cpu().numpy() for key in item.sources]
                if not np.array_equal(decoded, expected) or not np.array_equal(
                    expected, np.stack(evaluated) if item.parts else evaluated[0]
                ):
                    raise RuntimeError(f"{item.name}: the packed block does not decode to the block's weights")
            self.writer.write_tensor_data(data)
            self.next += 1
        if self.next == first:
            raise RuntimeError(f"block {index} ({prefix}) is not the block the GGUF file expects next")
        log.debug("block %d written to %s", index, self.path)

    def block_done(self, index: int, chains: dict[str, Chain], artifacts: dict[str, Tensor], metrics: dict) -> None:
        """Nothing to keep: the file is the only state, and it is not resumable."""

    def restore(self, index: int) -> Any:
        raise LowbitError("a streamed GGUF export cannot resume an interrupted run: start again with --overwrite")

    def chains(self, index: int, store: ChainStore) -> dict[str, Chain]:
        raise LowbitError("a streamed GGUF export cannot resume an interrupted run: start again with --overwrite")

    def finish(self, model: nn.Module) -> dict[str, str]:
        """Write what lies after the blocks, close the file; GGUF tensor name -> type for the run record."""
        try:
            self._write_outside_blocks(model.state_dict())
            if self.next != len(self.prepared.tensors):
                missing = self.prepared.tensors[self.next].name
                raise RuntimeError(f"the streamed GGUF export ended before {missing} was written")
        finally:
            self.writer.close()
        log.info("wrote %s (%d tensors, streamed)", self.path, self.next)
        return self.prepared.tensor_types()
