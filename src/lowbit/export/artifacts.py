"""Stage artifacts (e.g. AWQ's scales and clips) saved next to an export so later runs can reuse them."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

from lowbit.formats.files import ARTIFACTS_FILE


def write_artifacts(directory: Path, tensors: dict[str, Tensor]) -> None:
    """Write `tensors` (name -> tensor) into `directory`; nothing is written when there are none."""
    if tensors:
        save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, directory / ARTIFACTS_FILE)


def read_artifacts(directory: str | Path) -> dict[str, Tensor]:
    """The artifacts of an export directory ({} when the run produced none)."""
    path = Path(directory) / ARTIFACTS_FILE
    return load_file(path) if path.exists() else {}
