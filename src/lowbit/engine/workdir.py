"""Checkpoint and resume: a work directory next to the output keeps every finished block and model stage.

Layout (each file written to a temp name, then renamed, so a crash or kill -9 leaves only whole files):

    manifest.json                 what the run depends on (model, config, calibration digest, versions)
    g00/model.safetensors         a finished model-scope stage: the whole model state + its artifacts
    g00/stage/                    the stage's own mid-stage checkpoints (TEQ's optimizer state, InvarExplore's record)
    g01/block-0003.safetensors    a finished block: its parameters, quantized records, new artifacts, metrics

A resumed run trains nothing that was finished: it reloads the finished groups and blocks and replays only their
forward passes to rebuild the next block's inputs (the float chain through the original weights, the quantized
chain through the reloaded ones: the same kernels on the same data, so the same bits). Saving the chains instead
would write nsamples x seqlen x hidden floats per block, which costs more than the replay. Every stage's
randomness comes from per-block / per-step generators seeded from (seed, block, step), so the continuation is
the same computation as an uninterrupted run and the export is byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lowbit.distributed.ranks import LOG_DIR
from lowbit.errors import LowbitError
from lowbit.quantizer import QuantizedWeight
from lowbit.scheme import QuantScheme

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
WORK_FORMAT = 1
_BLOCK = re.compile(r"^block-(\d{4})\.safetensors$")


def work_dir_for(out: str | Path) -> Path:
    """Where a run writing `out` keeps its checkpoints: a hidden sibling of the output directory."""
    final = Path(out).expanduser()
    return final.parent / f".{final.name}.lowbit-work"


def _entries(path: Path) -> list[Path]:
    """What a work directory holds besides the ranks' logs of a data-parallel run (lowbit/distributed/ranks.py)."""
    return [entry for entry in path.iterdir() if entry.name != LOG_DIR] if path.is_dir() else []


def clear_work_dir(path: str | Path) -> None:
    """Remove a work directory's checkpoints, keeping the ranks' logs (the directory goes when nothing is left)."""
    path = Path(path)
    for entry in _entries(path):
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()


def atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from lowbit.export.atomic import write_error

    temp = path.with_name(f".{path.name}.partial")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(temp), metadata=metadata)
    except Exception as error:  # disk full / permissions: one clear message; the finished blocks stay resumable
        temp.unlink(missing_ok=True)
        needed = sum(t.numel() * t.element_size() for t in tensors.values())
        raise write_error(error, path, needed) from error
    os.replace(temp, path)


def estimate_checkpoint_bytes(model: nn.Module) -> int:
    """Peak size of a work dir: every block's state plus, after a model-scope stage, the whole model (twice)."""
    return 3 * sum(p.numel() * p.element_size() for p in model.parameters())


def _atomic_json(data: Any, path: Path) -> None:
    temp = path.with_name(f".{path.name}.partial")
    temp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(temp, path)


def load_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})  # noqa: SIM118
    except Exception as error:  # a damaged checkpoint file: say which and how to recover
        raise LowbitError(
            f"checkpoint file '{path}' is damaged ({type(error).__name__}); delete it to resume from the block "
            "before, or re-run with --overwrite to start over"
        ) from error


def split_prefix(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {key[len(prefix) :]: t for key, t in tensors.items() if key.startswith(prefix)}


def model_digest(path: Path) -> dict[str, Any]:
    """A cheap identity of a model directory: config.json's hash plus name, size and head/tail hash of each file.

    Hashing whole multi-GB weight files would cost minutes; head and tail catch a different checkpoint.
    """
    files: dict[str, Any] = {}
    for file in sorted(p for p in Path(path).iterdir() if p.is_file()):
        size = file.stat().st_size
        digest = hashlib.sha256()
        with file.open("rb") as handle:
            digest.update(handle.read(1 << 20))
            if size > 2 << 20:
                handle.seek(-(1 << 20), os.SEEK_END)
                digest.update(handle.read(1 << 20))
        files[file.name] = f"{size}:{digest.hexdigest()[:16]}"
    return files


def tensor_digest(tensor: Tensor | None) -> str | None:
    """sha256 of a tensor's bytes (the calibration windows), so a resume on other data is refused."""
    if tensor is None:
        return None
    return hashlib.sha256(tensor.contiguous().cpu().numpy().tobytes()).hexdigest()


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new)):
            found += _differences(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        return found
    return [] if old == new else [path]


def _refuse_differences(path: Path, saved: Any, current: Any, prefix: str = "") -> None:
    differ = _differences(saved, current, prefix)
    if differ:
        raise LowbitError(
            f"cannot resume from '{path}': it was written by a run with another {', '.join(differ[:4])}"
            f"{' (and more)' if len(differ) > 4 else ''}; re-run with the original settings, or pass --overwrite "
            "to discard those checkpoints and start over"
        )


@dataclass
class BlockState:
    """What one finished block contributed: parameters, quantized records, new artifacts and metrics."""

    params: dict[str, Tensor]
    records: dict[str, QuantizedWeight]
    artifacts: dict[str, Tensor]
    metrics: dict[str, Any]


class WorkDir:
    """The checkpoints of one run. Open it with `WorkDir.open`; groups are numbered in recipe order."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @staticmethod
    def check(path: str | Path, settings: dict[str, Any], *, resume: bool) -> None:
        """Refuse early (before loading anything) a leftover work dir without --resume, or a resume whose settings
        differ; `settings` is the `config` part of the fingerprint. `open` checks the whole fingerprint later."""
        path = Path(path)
        settings = json.loads(json.dumps(settings, sort_keys=True, default=str))
        if _entries(path) and not resume:
            raise LowbitError(
                f"an interrupted run left its checkpoints in '{path}': re-run with --resume to continue it, or "
                "with --overwrite to start over"
            )
        manifest = path / MANIFEST
        if resume and manifest.is_file():
            saved = json.loads(manifest.read_text()).get("fingerprint", {})
            _refuse_differences(path, saved.get("config", {}), settings, "config")

    @classmethod
    def open(cls, path: str | Path, fingerprint: dict[str, Any], *, resume: bool) -> WorkDir:
        """Create the work directory, or (with `resume`) reopen one whose fingerprint matches this run."""
        path = Path(path)
        manifest = path / MANIFEST
        fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        cls.check(path, fingerprint.get("config", {}), resume=resume)
        if resume and manifest.is_file():
            _refuse_differences(path, json.loads(manifest.read_text()).get("fingerprint", {}), fingerprint)
            log.info("resuming from the checkpoints in %s", path)
            return cls(path)
        if resume:
            log.warning("--resume: no checkpoints at %s, starting from the beginning", path)
            clear_work_dir(path)
        path.mkdir(parents=True, exist_ok=True)
        _atomic_json({"format": WORK_FORMAT, "fingerprint": fingerprint}, manifest)
        return cls(path)

    def holds_progress(self) -> bool:
        """Whether anything finished was saved (a block, a model stage, a stage's own checkpoint)."""
        return any(
            path.is_file() and path.name != MANIFEST
            for entry in _entries(self.path)
            for path in (entry.rglob("*") if entry.is_dir() else (entry,))
        )

    def group(self, index: int) -> GroupCheckpoint:
        return GroupCheckpoint(self.path / f"g{index:02d}")

    def remove(self) -> None:
        """Remove the checkpoints (a data-parallel run's logs stay until its ranks have finished)."""
        clear_work_dir(self.path)


class GroupCheckpoint:
    """The checkpoints of one stage group: a model-scope stage, or consecutive block-scope stages."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def stage_dir(self) -> Path:
        """A directory for a model-scope stage's own mid-stage checkpoints."""
        directory = self.path / "stage"
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    # --- model-scope stages -------------------------------------------------------------------------------

    @property
    def _model_file(self) -> Path:
        return self.path / "model.safetensors"

    def model_done(self) -> bool:
        return self._model_file.is_file()

    def save_model(self, model: nn.Module, artifacts: dict[str, Tensor], metrics: dict[str, Any]) -> None:
        """The whole model after the stage, with the stage's artifacts and metrics (one atomic file)."""
        self.path.mkdir(parents=True, exist_ok=True)
        tensors = {f"param.{k}": v for k, v in _unique_state(model).items()}
        tensors.update({f"art.{k}": v for k, v in artifacts.items()})
        atomic_save(tensors, self._model_file, {"metrics": json.dumps(metrics, default=str)})

    def load_model(self, model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Put the saved model state back; returns the stage's artifacts and metrics."""
        tensors, meta = load_tensors(self._model_file)
        _load_state(model, split_prefix(tensors, "param."), str(self._model_file))
        return split_prefix(tensors, "art."), json.loads(meta.get("metrics", "{}"))

    # --- block-scope stages -------------------------------------------------------------------------------

    def finished_blocks(self) -> list[int]:
        """Indices of finished blocks: 0..k without gaps (a later file after a gap is ignored)."""
        if not self.path.is_dir():
            return []
        found = {int(m.group(1)) for p in self.path.iterdir() if (m := _BLOCK.match(p.name))}
        done = []
        while len(done) in found:
            done.append(len(done))
        return done

    def save_block(
        self,
        index: int,
        block: nn.Module,
        records: dict[str, QuantizedWeight],
        artifacts: dict[str, Tensor],
        metrics: dict[str, Any],
    ) -> None:
        """One atomic file per finished block: its parameters, records, new artifacts and metrics."""
        self.path.mkdir(parents=True, exist_ok=True)
        tensors = {f"param.{k}": v for k, v in block.state_dict().items()}
        schemes = {}
        for name, record in records.items():
            tensors.update({f"rec.{name}.{k}": v for k, v in record.state_dict().items()})
            schemes[name] = record.scheme.to_dict()
        tensors.update({f"art.{k}": v for k, v in artifacts.items()})
        meta = {"metrics": json.dumps(metrics, default=str), "schemes": json.dumps(schemes)}
        atomic_save(tensors, self.path / f"block-{index:04d}.safetensors", meta)

    def load_block(self, index: int, block: nn.Module) -> BlockState:
        """Put a finished block's parameters back; returns its records, artifacts and metrics."""
        path = self.path / f"block-{index:04d}.safetensors"
        tensors, meta = load_tensors(path)
        params = split_prefix(tensors, "param.")
        _load_state(block, params, str(path))
        records = {}
        for name, scheme in json.loads(meta.get("schemes", "{}")).items():
            state = split_prefix(tensors, f"rec.{name}.")
            records[name] = QuantizedWeight.from_state(state, QuantScheme.from_dict(scheme))
        return BlockState(params, records, split_prefix(tensors, "art."), json.loads(meta.get("metrics", "{}")))


def _unique_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's state without repeats of tied tensors (safetensors refuses shared storage)."""
    seen: set[tuple] = set()
    state = {}
    for key, tensor in model.state_dict().items():
        pointer = (tensor.data_ptr(), tuple(tensor.shape))
        if pointer in seen:
            continue
        seen.add(pointer)
        state[key] = tensor
    return state


def _load_state(module: nn.Module, state: dict[str, Tensor], where: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    own = _unique_state(module)
    missing = [key for key in missing if key in own]
    if missing or unexpected:
        raise LowbitError(
            f"checkpoint '{where}' does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "re-run with --overwrite to start over"
        )
