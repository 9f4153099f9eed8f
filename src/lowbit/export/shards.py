"""Sharded safetensors writing, one group of tensors (a finished decoder block's export) at a time.

Why: a model larger than memory must hand each finished block's export tensors to disk and let them go
(lowbit's design notes). The writer holds at most one group: `add_block` writes the group at once to its own file
(`.group-0000k.safetensors.partial`, k counting groups from 0) and keeps only names and sizes. A group is never
split across shards, so a shard closes at a group boundary; it is then assembled from its groups' files by copying
raw bytes (`safetensors_layout.merge`: no tensors, bounded memory) and they are deleted. The layout depends only on
the groups and `max_shard_bytes`, so the same inputs give the same files (a resumed run writes the same bytes).

What it writes is what transformers writes: `model.safetensors` alone when everything fits one shard (the bytes of
a one-shot `save_file` of the same tensors, metadata `{"format": "pt"}`), else `model-0000k-of-0000n.safetensors`
plus `model.safetensors.index.json` (`metadata.total_size`, sorted `weight_map`). Meta tensors and duplicate names
raise (pitfall 3 of lowbit's design notes: peers silently wrote empty weights); a tensor tied to one already
given (same storage and view, e.g. lm_head = embed_tokens) is written once, under the first name. Ties are found
through weak references only: a tensor is tied to an earlier one only while the caller keeps that one's storage
alive (a tied lm_head comes with the embedding in `finish`'s remainder, so that case always holds).

A crash part-way leaves only `.group-*.partial` and `.shard-*.partial` files in the directory (and, while
`save_file` runs, its own `.tmp*` file); the atomic output directory of the caller removes them with the rest.
"""

from __future__ import annotations

import json
import logging
import re
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.export.safetensors_layout import merge
from lowbit.formats.files import INDEX_FILE, WEIGHTS_FILE

log = logging.getLogger(__name__)

SINGLE_FILE = WEIGHTS_FILE

DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' save_pretrained default since v4.47
METADATA = {"format": "pt"}  # what save_pretrained and lowbit's packed writer have always written

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b)?\s*$", re.IGNORECASE)
_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4}
_SIZE_HINT = (
    "pass a positive number of bytes or a string like '500MB' or '5GB' (transformers' convention: KB/MB/GB = "
    "10^3/10^6/10^9 bytes, KiB/MiB/GiB = 2^10/2^20/2^30, a lowercase final 'b' means bits)"
)


def parse_max_shard_size(value: int | str) -> int:
    """`max_shard_size` in bytes: an int, or '500MB' / '5GB' / '2GiB' as transformers reads them."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise LowbitError(f"max_shard_size={value!r} is not a size: {_SIZE_HINT}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(value)
        if match is None:
            raise LowbitError(f"max_shard_size={value!r} is not a size: {_SIZE_HINT}")
        number, unit = match.groups()
        scale = 1
        if unit:
            base = 1024 if unit[1:2].lower() == "i" else 1000
            scale = base ** _POWERS[unit[0].lower()]
            if unit.endswith("b") and base == 1000:
                scale = scale / 8
        size = int(float(number) * scale)
    if size < 1:
        raise LowbitError(f"max_shard_size={value!r} is not positive: {_SIZE_HINT}")
    return size


def tensor_bytes(tensor: Tensor) -> int:
    """The bytes a tensor takes in a safetensors file."""
    return tensor.numel() * tensor.element_size()


def _storage_key(tensor: Tensor) -> tuple[str, int]:
    return str(tensor.device), tensor.untyped_storage().data_ptr()


def _view_key(tensor: Tensor) -> tuple:
    return tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype


class ShardWriter:
    """Write groups of tensors into safetensors shards of at most `max_shard_bytes` (one oversized group excepted).

    A shard closes (is assembled from its groups' files) as soon as it reaches `max_shard_bytes`, or before a group
    that would take it past that. `sync=True` fsyncs each shard as it closes (a resumable run marks a block done
    only once its shard is on disk). `groups_done` counts the groups written to their files so far (for resuming;
    group files are not fsynced, so with `sync=True` only the groups of closed shards are known to be on disk).
    """

    def __init__(
        self, directory: str | Path, max_shard_bytes: int | str, *, sync: bool = False, keep_merged: bool = False
    ) -> None:
        self.directory = Path(directory)
        self.max_shard_bytes = parse_max_shard_size(max_shard_bytes)
        self.sync = sync
        # resumable: a closed shard's group files stay until `drop_merged` (after the caller's checkpoint), so the
        # state saved at the last checkpoint still names files that exist
        self.keep_merged = keep_merged
        self._merged: list[Path] = []
        self.groups_done = 0
        self._open_groups: list[Path] = []  # the files of the open shard's groups
        self._open_names: list[str] = []
        self._open_bytes = 0
        self._closed: list[tuple[Path, list[str]]] = []  # temp file, its tensor names
        self._names: set[str] = set()
        self._storages: dict[tuple[str, int], tuple[weakref.ref, dict[tuple, str]]] = {}
        self.total_bytes = 0
        self._finished = False

    def add_block(self, tensors: Mapping[str, Tensor]) -> None:
        """Add a group that is never split across shards: written to its file now, closing shards as they fill."""
        if self._finished:
            raise LowbitError("ShardWriter.add_block after finish: the export is already complete")
        group = self._accept(tensors)
        size = sum(tensor_bytes(t) for t in group.values())
        if self._open_names and self._open_bytes + size > self.max_shard_bytes:
            self._close()
        self._spill(group)
        del group  # the caller's tensors are no longer referenced here
        self._open_bytes += size
        if self._open_bytes >= self.max_shard_bytes:
            self._close()

    def state(self) -> dict[str, Any]:
        """What `restore` needs to continue after the groups added so far (JSON; tie tracking is not kept)."""
        return {
            "groups_done": self.groups_done,
            "open_groups": [path.name for path in self._open_groups],
            "open_names": self._open_names,
            "open_bytes": self._open_bytes,
            "closed": [[path.name, names] for path, names in self._closed],
            "total_bytes": self.total_bytes,
        }

    @classmethod
    def restore(
        cls, directory: str | Path, max_shard_bytes: int | str, state: dict[str, Any], *, sync: bool = False
    ) -> ShardWriter:
        """A resumable writer continuing from `state` in `directory`; files of groups added after it are removed."""
        writer = cls(directory, max_shard_bytes, sync=sync, keep_merged=True)
        writer.groups_done = state["groups_done"]
        writer._open_groups = [writer.directory / name for name in state["open_groups"]]
        writer._open_names = list(state["open_names"])
        writer._open_bytes = state["open_bytes"]
        writer._closed = [(writer.directory / name, list(names)) for name, names in state["closed"]]
        writer.total_bytes = state["total_bytes"]
        writer._names = {name for _, names in writer._closed for name in names} | set(writer._open_names)
        known = {path.name for path in writer._open_groups} | {path.name for path, _ in writer._closed}
        missing = sorted(name for name in known if not (writer.directory / name).is_file())
        if missing:
            raise LowbitError(f"the partial export in '{directory}' lacks {missing[0]}: re-run with --overwrite")
        for path in writer.directory.glob(".*.partial"):
            if path.name not in known:
                path.unlink()  # a group or shard of the interrupted block, or merged groups already in a shard
        return writer

    def drop_merged(self) -> None:
        """Delete the group files already copied into closed shards (a resumable writer, after a checkpoint)."""
        for path in self._merged:
            path.unlink(missing_ok=True)
        self._merged = []

    def group_file(self, index: int) -> Path:
        """Where group `index` (from 0, in `add_block` order) waits until its shard is assembled."""
        return self.directory / f".group-{index:05d}.safetensors.partial"

    def finish(
        self, extra: Mapping[str, Tensor] | None = None, index_metadata: dict[str, Any] | None = None
    ) -> list[str]:
        """Write `extra` (each tensor its own group), name the shards, write the index; the files written.

        One shard becomes `model.safetensors` without an index; n shards become `model-0000k-of-0000n.safetensors`
        and `model.safetensors.index.json` (`index_metadata` adds to its metadata, e.g. total_parameters).
        """
        for name, tensor in (extra or {}).items():
            self.add_block({name: tensor})
        if self._open_names or not self._closed:
            self._close()
        self.drop_merged()
        self._finished = True
        count = len(self._closed)
        if count == 1:
            temp, _ = self._closed[0]
            temp.rename(self.directory / SINGLE_FILE)
            log.debug("wrote %s (%d bytes of tensors)", SINGLE_FILE, self.total_bytes)
            return [SINGLE_FILE]
        weight_map = {}
        files = []
        for index, (temp, names) in enumerate(self._closed, start=1):
            name = f"model-{index:05d}-of-{count:05d}.safetensors"
            temp.rename(self.directory / name)
            weight_map.update(dict.fromkeys(names, name))
            files.append(name)
        index_json = {
            "metadata": {**(index_metadata or {}), "total_size": self.total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.directory / INDEX_FILE).write_text(json.dumps(index_json, indent=2, sort_keys=True) + "\n")
        log.info("wrote %d shards (%d bytes of tensors) and %s", count, self.total_bytes, INDEX_FILE)
        return [*files, INDEX_FILE]

    def _accept(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Check a group (no meta, no name twice) and drop tensors tied to ones already taken."""
        group: dict[str, Tensor] = {}
        for name, tensor in tensors.items():
            if not isinstance(tensor, Tensor):
                raise LowbitError(f"export value {name!r} is a {type(tensor).__name__}, not a tensor")
            if tensor.device.type == "meta":
                raise LowbitError(
                    f"export tensor {name} is on the meta device (never loaded): materialize the block before "
                    "exporting it; nothing with empty weights is written"
                )
            if name in self._names:
                raise LowbitError(f"export tensor {name} was given twice: each name is written once")
            tied = self._tied_to(name, tensor)
            if tied is not None:
                log.debug("%s shares storage with %s: written once, as %s", name, tied, tied)
                continue
            self._names.add(name)
            group[name] = tensor
        return group

    def _tied_to(self, name: str, tensor: Tensor) -> str | None:
        """The name an identical view of this storage was taken under (storage still alive), else None.

        Only a weak reference to each storage is kept, and its entry goes when the storage is freed.
        """
        if tensor.numel() == 0:
            return None
        key = _storage_key(tensor)
        entry = self._storages.get(key)
        if entry is None or entry[0]() is None:  # new storage, or a freed one whose address was reused
            storages = self._storages

            def forget(ref: weakref.ref, key: tuple[str, int] = key) -> None:
                if storages.get(key, (None,))[0] is ref:
                    del storages[key]

            entry = (weakref.ref(tensor.untyped_storage(), forget), {})
            self._storages[key] = entry
        views = entry[1]
        view = _view_key(tensor)
        if view in views:
            return views[view]
        views[view] = name  # another view of the same storage is written as its own copy (_plain)
        return None

    def _spill(self, group: dict[str, Tensor]) -> None:
        """Write a group to its own file (none for a group left empty by ties) and count it done."""
        if group:
            path = self.group_file(self.groups_done)
            save_file({name: _plain(t) for name, t in group.items()}, str(path))
            self._open_groups.append(path)
            self._open_names.extend(group)
        self.groups_done += 1

    def _close(self) -> None:
        """Assemble the open shard from its groups' files under a temporary name, deleting them as they are copied."""
        temp = self.directory / f".shard-{len(self._closed) + 1:05d}.safetensors.partial"
        merge(self._open_groups, temp, METADATA, remove=not self.keep_merged, sync=self.sync)
        if self.keep_merged:
            self._merged.extend(self._open_groups)
        self._closed.append((temp, self._open_names))
        self.total_bytes += self._open_bytes
        log.debug("closed shard %d: %d groups, %d tensors, %d bytes", len(self._closed), len(self._open_groups),
                  len(self._open_names), self._open_bytes)  # fmt: skip
        self._open_groups, self._open_names, self._open_bytes = [], [], 0


def _plain(tensor: Tensor) -> Tensor:
    """A detached, contiguous CPU tensor with its own storage when it shares one with a different view."""
    out = tensor.detach().to("cpu").contiguous()
    if out.numel() and out.untyped_storage().nbytes() != tensor_bytes(out):
        out = out.clone()  # a slice of a larger storage: safetensors writes each tensor's own bytes
    return out
