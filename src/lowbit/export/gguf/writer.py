"""Write a GGUF export: one `model.gguf` (header, metadata, tensor infos, then each tensor's data in turn), the run
record and the model card, then read the file back and check every tensor against what lowbit evaluated.

The writer is gguf-py's `GGUFWriter` used the streaming way: every tensor info goes into the header from the plan
(shapes and types only), then the data is packed and written one tensor at a time, so at most one packed tensor
is in memory beside the model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.gguf.arch import GgufArch, add_hparams, gguf_arch
from lowbit.export.gguf.checks import check_gguf_records
from lowbit.export.gguf.tensors import PlannedTensor, plan_tensors, tensor_bytes
from lowbit.export.gguf.verify import verify_file
from lowbit.export.gguf.vocab import GgufVocab, add_vocab, build_vocab
from lowbit.formats.files import GGUF_FILE, RECORD_FILE
from lowbit.formats.gguf_types import GGUF_MIXES, GGUF_TYPES
from lowbit.quantizer import QuantizedWeight
from lowbit.scheme import QuantScheme
from lowbit.version import __version__

log = logging.getLogger(__name__)


@dataclass
class PreparedGguf:
    """A validated GGUF export, ready to write (the tensors are packed while writing)."""

    model: nn.Module
    records: dict[str, QuantizedWeight]
    arch: GgufArch
    vocab: GgufVocab
    tensors: list[PlannedTensor]
    file_type: int
    warnings: list[str] = field(default_factory=list)

    def tensor_types(self) -> dict[str, str]:
        """GGUF tensor name -> type name, for the run record ("which type each tensor got")."""
        return {t.name: t.qtype.name for t in self.tensors}

    def write(self, directory: Path, tokenizer: Any, record: dict[str, Any], **_: Any) -> list[str]:
        """Write `model.gguf` and the run record into `directory`, verify the file, return the written files."""
        del tokenizer  # the vocabulary was read at prepare time
        path = directory / GGUF_FILE
        write_file(path, self, record)
        verify_file(path, self)
        (directory / RECORD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
        return [GGUF_FILE]


def file_type_of(scheme: QuantScheme, records: dict[str, QuantizedWeight]) -> int:
    """general.file_type: the mix's, or the one type of every quantized linear."""
    if scheme.gguf_mix is not None:
        return GGUF_MIXES[scheme.gguf_mix][1]
    if not records:  # a streamed run plans the file before any record exists
        return GGUF_TYPES[scheme.gguf].file_type  # type: ignore[index]
    types = {r.scheme.gguf for r in records.values()}
    if len(types) != 1:
        raise LowbitError(f"a single-type GGUF export holds one weight type, this one has {sorted(map(str, types))}")
    return GGUF_TYPES[types.pop()].file_type  # type: ignore[index]


def prepare_gguf(
    model: nn.Module,
    records: dict[str, QuantizedWeight],
    tokenizer: Any,
    scheme: QuantScheme,
    outside: dict[str, QuantizedWeight] | None = None,
) -> PreparedGguf:
    """Validate the records, the family and the tokenizer, and plan the file; nothing is written. `scheme` is the
    run's (a mix names the file type); `outside` holds the embedding/output records the run rounded
    (embeddings.py)."""
    arch = gguf_arch(model)
    check_gguf_records(records)
    vocab = build_vocab(tokenizer, int(model.config.vocab_size))
    every = {**records, **(outside or {})}
    tensors = plan_tensors(model, arch, {name: r.scheme for name, r in every.items()})
    return PreparedGguf(model, every, arch, vocab, tensors, file_type_of(scheme, records))


def _model_name(model: nn.Module, record: dict[str, Any]) -> str:
    name = str(record.get("model") or getattr(model.config, "_name_or_path", "") or "model")
    return Path(name.rstrip("/")).name or "model"


def _add_general(writer: gguf.GGUFWriter, prepared: PreparedGguf, record: dict[str, Any]) -> None:
    config = record.get("config", {})
    writer.add_name(_model_name(prepared.model, record))
    writer.add_quantized_by(f"lowbit {__version__}")
    writer.add_file_type(prepared.file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string("lowbit.version", __version__)
    writer.add_string("lowbit.recipe", str(config.get("recipe", "")))
    writer.add_string("lowbit.scheme", json.dumps(config.get("scheme", {}), sort_keys=True))
    writer.add_string("lowbit.settings", json.dumps(config, sort_keys=True, default=str))


def start_file(path: Path, prepared: PreparedGguf, record: dict[str, Any]) -> gguf.GGUFWriter:
    """Open `path` and write the header, metadata and every tensor info from the plan (shapes and types only); the
    caller writes each tensor's data in plan order and closes the writer. `record` needs only "model" and "config"
    (a streamed run starts the file before its run record exists)."""
    writer = gguf.GGUFWriter(path, prepared.arch.arch_name)
    try:
        _add_general(writer, prepared, record)
        add_hparams(writer, prepared.model)
        add_vocab(writer, prepared.vocab)
        for item in prepared.tensors:
            if item.quantized or item.qtype == gguf.GGMLQuantizationType.BF16:
                dtype, shape = np.dtype(np.uint8), gguf.quant_shape_to_byte_shape(item.shape, item.qtype)
            else:
                dtype, shape = (
                    np.dtype(np.float32 if item.qtype == gguf.GGMLQuantizationType.F32 else np.float16),
                    item.shape,
                )
            writer.add_tensor_info(item.name, shape, dtype, item.nbytes, raw_dtype=item.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
    except BaseException:
        writer.close()
        raise
    return writer


def write_file(path: Path, prepared: PreparedGguf, record: dict[str, Any]) -> None:
    """Header and metadata from the plan, then each tensor's data as it is packed."""
    writer = start_file(path, prepared, record)
    try:
        state = prepared.model.state_dict()
        for item in prepared.tensors:
            writer.write_tensor_data(tensor_bytes(item, state, prepared.records, prepared.arch))
    finally:
        writer.close()
    log.info("wrote %s (%d tensors)", path, len(prepared.tensors))
