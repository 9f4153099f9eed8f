"""The `fake` export: a plain Hugging Face directory holding dequantized float weights.

The weights go through the same block-by-block shard writer as the packed formats (blocks.py), so a streamed run
can write them too; config.json and generation_config.json are written as `save_pretrained` writes them, and one
shard is byte for byte the `model.safetensors` `save_pretrained` writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from lowbit.export.blocks import FAKE, export_context, write_weights
from lowbit.export.shards import DEFAULT_MAX_SHARD_SIZE, ShardWriter, parse_max_shard_size
from lowbit.formats.files import RECORD_FILE


def save_model_config(directory: Path, model: nn.Module) -> None:
    """config.json (dtype and architectures set) and generation_config.json, as `save_pretrained` writes them."""
    if not isinstance(model, PreTrainedModel):
        return
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [model.__class__.__name__.removeprefix("FSDP")]
    if model.is_remote_code():
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(model, directory, config=model.config)
    model.config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)


def write_fake(
    directory: Path,
    model: nn.Module,
    tokenizer: Any,
    record: dict[str, Any],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    writer: ShardWriter | None = None,
) -> None:
    """Save model (already holding the dequantized weights), tokenizer and the run record into `directory`; with
    a streamed run's `writer`, only what lies outside the blocks is left to write."""
    max_bytes = parse_max_shard_size(max_shard_size)
    save_model_config(directory, model)
    metadata = {"total_parameters": model.num_parameters()} if isinstance(model, PreTrainedModel) else None
    write_weights(directory, export_context(FAKE, model), model, {}, max_bytes, metadata, writer=writer)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    (directory / RECORD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
