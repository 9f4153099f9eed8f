"""The exact bytes of a safetensors file, and merging files into one without loading a tensor.

Why: the shard writer spills each group of tensors to its own file and later assembles a shard from those files
with plain file I/O; the shard must be byte for byte what one `save_file` of all its tensors writes, so a streamed
export equals a resident one. The rules are safetensors 0.8's (`safetensors/src/tensor.rs`: `prepare`, `Dtype`,
`impl Serialize for Metadata`), checked against `save_file` in tests/test_export_shards.py:

- data order: by dtype, descending in the order of the `Dtype` enum (`DTYPE_ORDER`), then by name ascending (Rust
  compares UTF-8 bytes, which is Python's code point order). The enum is only roughly by alignment: within one
  size its order decides, e.g. U64 > I64 > F64 > C64 and BF16 > F16 > U16 > I16;
- the data section is the tensors' bytes back to back in that order, no padding; `data_offsets` are relative to it;
- header: an 8-byte little-endian length n, then n bytes of compact JSON (serde_json: no whitespace, non-ASCII
  written raw, `"` `\\` and control characters escaped as Python's `ensure_ascii=False` does), `"__metadata__"`
  first when metadata is given (even `{}`), then each tensor in data order as `{"dtype","shape","data_offsets"}`;
  the JSON is padded with spaces to a multiple of 8 bytes. Metadata is a Rust HashMap: with two or more keys its
  order differs from run to run, so byte identity holds for at most one metadata key (lowbit writes
  `{"format": "pt"}`). One case is not reproduced: safetensors 0.8 writes invalid JSON (`{},"__metadata__":{}}`)
  for empty metadata `{}` and no tensors; here that is the valid `{"__metadata__":{}}`.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError

# safetensors' `Dtype` enum in declaration order (its derived Ord); the data section sorts by it, descending.
DTYPE_ORDER = (
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
    "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
)  # fmt: skip
_RANK = {dtype: rank for rank, dtype in enumerate(DTYPE_ORDER)}
METADATA_KEY = "__metadata__"
MAX_HEADER_BYTES = 100_000_000  # safetensors refuses a larger header
CHUNK_BYTES = 16 * 2**20  # one copy call or one read at a time: bounded memory whatever the tensor's size
# copy_file_range unusable here: across filesystems, unsupported by the filesystem or kernel, or refused by a sandbox
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM}


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: its header fields and where its bytes start in that file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0  # absolute offset of the first byte in its file


def sort_key(entry: Entry) -> tuple[int, str]:
    """Where a tensor goes in the data section: higher `Dtype` first, then by name."""
    rank = _RANK.get(entry.dtype)
    if rank is None:
        raise LowbitError(f"tensor {entry.name} has dtype {entry.dtype!r}, unknown to lowbit's safetensors layout")
    return -rank, entry.name


def ordered(entries: Iterable[Entry]) -> list[Entry]:
    """The entries in safetensors' data order."""
    return sorted(entries, key=sort_key)


def encode_header(entries: Sequence[Entry], metadata: Mapping[str, str] | None) -> bytes:
    """The 8-byte length and the padded JSON header of a file holding `entries` in this order (see `ordered`)."""
    header: dict[str, object] = {}
    if metadata is not None:
        header[METADATA_KEY] = dict(metadata)
    offset = 0
    for entry in entries:
        if entry.name == METADATA_KEY or entry.name in header:
            raise LowbitError(f"tensor name {entry.name!r} is reserved or given twice in one safetensors header")
        ends = [offset, offset + entry.nbytes]
        header[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": ends}
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def read_entries(path: Path) -> list[Entry]:
    """The tensors of a safetensors file in data order, with absolute offsets; checks that the sizes add up."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 <= length <= MAX_HEADER_BYTES:
            raise LowbitError(f"{path} is not a safetensors file: bad header length")
        header = json.loads(handle.read(length))
    start = 8 + length
    entries = []
    for name, info in header.items():
        if name != METADATA_KEY:
            first, last = info["data_offsets"]
            entries.append(Entry(name, info["dtype"], tuple(info["shape"]), last - first, start + first))
    entries.sort(key=lambda entry: entry.offset)
    end = start
    for entry in entries:
        if entry.offset != end or entry.nbytes < 0:
            raise LowbitError(f"{path}: tensor {entry.name} is not where the header says the previous one ends")
        end += entry.nbytes
    if end != path.stat().st_size:
        raise LowbitError(f"{path} holds {path.stat().st_size} bytes, its header describes {end}: truncated?")
    return entries


def copy_range(src: int, src_offset: int, dst: int, dst_offset: int, count: int) -> None:
    """Copy `count` bytes between file descriptors at these offsets: in the kernel if it can, else chunk by chunk."""
    kernel = getattr(os, "copy_file_range", None)
    while count > 0:
        size = min(count, CHUNK_BYTES)
        if kernel is not None:
            try:
                done = kernel(src, dst, size, src_offset, dst_offset)
            except OSError as error:
                if error.errno not in _NO_KERNEL_COPY:
                    raise
                done = 0
            if done <= 0:  # refused, or nothing copied (some filesystems): plain reads and writes from here
                kernel = None
                continue
        else:
            chunk = os.pread(src, size, src_offset)
            done = os.pwrite(dst, chunk, dst_offset) if chunk else 0
        if done <= 0:
            raise LowbitError(f"copying tensor bytes stopped short with {count} bytes left: a source file shrank?")
        src_offset, dst_offset, count = src_offset + done, dst_offset + done, count - done


def merge(
    sources: Sequence[Path], dest: Path, metadata: Mapping[str, str] | None, *, remove: bool = False, sync: bool = False
) -> list[str]:
    """Write `dest` as `save_file` of every tensor of `sources` would, copying raw bytes; its names in data order.

    `remove` deletes each source once its bytes are copied (disk use stays near one shard plus one group); `sync`
    fsyncs `dest` before returning.
    """
    parts = [(path, read_entries(path)) for path in sources]
    layout = ordered(entry for _, entries in parts for entry in entries)
    prefix = encode_header(layout, metadata)
    where: dict[str, int] = {}
    position = len(prefix)
    for entry in layout:
        where[entry.name] = position
        position += entry.nbytes
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        os.ftruncate(fd, position)
        written = 0
        while written < len(prefix):
            written += os.pwrite(fd, prefix[written:], written)
        for path, entries in parts:
            src = os.open(path, os.O_RDONLY)
            try:
                for entry in entries:
                    copy_range(src, entry.offset, fd, where[entry.name], entry.nbytes)
            finally:
                os.close(src)
            if remove:
                path.unlink()
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return [entry.name for entry in layout]
