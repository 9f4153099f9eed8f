"""The `fake` export: a plain Hugging Face directory holding dequantized float weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from lowbit.formats.files import RECORD_FILE


def write_fake(directory: Path, model: nn.Module, tokenizer: Any, record: dict[str, Any]) -> None:
    """Save model (already holding the dequantized weights), tokenizer and the run record into `directory`."""
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    (directory / RECORD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
