"""Where the block loop keeps its activation chains: in RAM, or in files (`engine.offload`).

A chain is [nsamples, seqlen, hidden] fp32 on CPU (the float input, the quantized input, the float targets:
engine/context.py). The chains outgrow RAM long before one block does (128 x 2048 x 8192 fp32 is 8 GiB a chain, and
up to four are alive at once), so with engine.offload=disk each chain is a raw fp32 file, written and read one batch
at a time with explicit reads and writes into ordinary tensors. Not mmap: the pages of a mapped file count in the
process's resident set (VmHWM), which is what offloading is meant to keep low; pages read through the page cache do
not, and the kernel drops them when it needs the memory.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import math
import operator
import os
import shutil
import struct
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lowbit.errors import LowbitError

log = logging.getLogger(__name__)

Offload = Literal["ram", "disk"]
_ITEMSIZE = 4  # every chain is fp32
_PREFIX = ".lowbit-chains-"  # the private directory of a run's chain files
_CHUNK_BYTES = 64 << 20  # what one read or write moves where the engine's batch does not set it


class DiskChain:
    """An fp32 chain of shape [n, ...] in a raw file: `chain[slice]`, `chain[int]` and `chain[index tensor or list]`
    read fresh CPU tensors, `chain[slice] = tensor` writes rows. The file is removed when the chain is closed or
    garbage collected (or when its `ChainStore` closes)."""

    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, path: str | Path, shape: Sequence[int]) -> None:
        self.path = Path(path)
        self.shape = torch.Size(shape)
        self._row = math.prod(self.shape[1:]) * _ITEMSIZE  # bytes of one sample
        # exclusive create, read + write, unbuffered, private
        self._file = io.FileIO(self.path, "x+", opener=lambda name, flags: os.open(name, flags, 0o600))
        try:
            self._file.truncate(self.shape[0] * self._row)  # sparse: the blocks are allocated as rows are written
        except OSError as error:
            _discard(self._file, str(self.path))
            raise _chain_error(error, self.path) from error
        self._finalizer = weakref.finalize(self, _discard, self._file, str(self.path))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"DiskChain({tuple(self.shape)}, '{self.path}')"

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return _ITEMSIZE

    def close(self) -> None:
        """Close and remove the file now (later reads fail)."""
        self._finalizer()

    def __getitem__(self, index: Any) -> Tensor:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                out = torch.empty((max(stop - start, 0), *self.shape[1:]), dtype=self.dtype)
                self._read(start, out)
                return out
            return self._gather(list(range(start, stop, step)))
        if isinstance(index, Tensor) and index.dim() == 0:
            index = index.item()
        if isinstance(index, Tensor):
            if index.dtype in (torch.bool, torch.uint8) or index.is_floating_point():
                raise TypeError("a DiskChain is indexed by sample indices (an integer tensor), not by a mask")
            return self._gather(index.reshape(-1).tolist())
        if isinstance(index, (list, range)):
            return self._gather([operator.index(i) for i in index])
        try:
            row = operator.index(index)
        except TypeError:
            kind = type(index).__name__
            raise TypeError(f"a DiskChain takes a slice, an int or sample indices, not {kind}") from None
        return self._gather([row])[0]

    def __setitem__(self, index: slice | int, value: Tensor) -> None:
        if not isinstance(index, slice):
            row = self._checked([operator.index(index)])[0]
            index, value = slice(row, row + 1), value.unsqueeze(0)
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise TypeError("a DiskChain writes consecutive rows (a slice with step 1)")
        expected = (max(stop - start, 0), *self.shape[1:])
        if tuple(value.shape) != expected:
            raise ValueError(f"rows of shape {tuple(value.shape)} written where {expected} fit")
        data = value.detach().to("cpu", torch.float32).contiguous()
        try:
            _write_all(self._file, _bytes_of(data), start * self._row)
        except OSError as error:
            raise _chain_error(error, self.path) from error

    def _checked(self, rows: list[int]) -> list[int]:
        n = len(self)
        checked = [row + n if row < 0 else row for row in rows]
        bad = [row for row, fixed in zip(rows, checked, strict=True) if not 0 <= fixed < n]
        if bad:
            raise IndexError(f"index {bad[0]} is out of bounds for a chain of {n} samples")
        return checked

    def _gather(self, rows: list[int]) -> Tensor:
        """Rows in the order asked, each run of consecutive rows read at once."""
        rows = self._checked(rows)
        out = torch.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        first = 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i] != rows[i - 1] + 1:
                self._read(rows[first], out[first:i])
                first = i
        return out

    def _read(self, row: int, out: Tensor) -> None:
        if self._file.closed:
            raise ValueError(f"{self!r} is closed")
        _read_all(self._file, _bytes_of(out), row * self._row)


Chain = Tensor | DiskChain


class ChainStore:
    """Makes the block loop's chains: fp32 CPU tensors (`ram`), or DiskChains in a private directory under `base`
    (the run's work directory, else the system's temp directory) that `close` removes with every file in it.

    `peak_bytes` is the most bytes its chains held at once (a chain counts from `new` until it is garbage
    collected): what the chains cost a process, measured rather than estimated, so a data-parallel run can show
    that each rank holds its share of the samples (the run record's `chains.peak_bytes_per_rank`)."""

    def __init__(self, offload: Offload = "ram", base: str | Path | None = None) -> None:
        if offload not in ("ram", "disk"):
            raise LowbitError(f"chains are kept in 'ram' or on 'disk', got '{offload}' (auto is resolved by the plan)")
        self.offload = offload
        self.base = None if base is None else Path(base)
        self._directory: Path | None = None
        self._count = 0
        self._live: weakref.WeakSet[DiskChain] = weakref.WeakSet()
        self.live_bytes = 0
        self.peak_bytes = 0

    @property
    def on_disk(self) -> bool:
        return self.offload == "disk"

    @property
    def directory(self) -> Path | None:
        """The directory holding the chain files (None until the first one)."""
        return self._directory

    def new(self, shape: Sequence[int]) -> Chain:
        """An uninitialised fp32 chain of `shape`, to be filled batch by batch."""
        if not self.on_disk:
            return self._counted(torch.empty(tuple(shape), dtype=torch.float32))
        if self._directory is None:
            base = self.base if self.base is not None and self.base.is_dir() else None
            self._directory = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=base))
            log.info("activation chains on disk in %s", self._directory)
        self._count += 1
        chain = DiskChain(self._directory / f"chain-{self._count:05d}.f32", shape)
        self._live.add(chain)
        return self._counted(chain)

    def _counted(self, chain: Chain) -> Chain:
        """`chain`, its bytes added to the live count until it is collected (a weak reference: no chain is kept)."""
        nbytes = chain.numel() * _ITEMSIZE
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(chain, self._release, nbytes)
        return chain

    def _release(self, nbytes: int) -> None:
        self.live_bytes -= nbytes

    def close(self) -> None:
        """Close and remove every chain file and the directory."""
        for chain in list(self._live):
            chain.close()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None

    def __enter__(self) -> ChainStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_stale_chains(directory: str | Path) -> None:
    """Remove the chain directories a killed run left in `directory` (a work directory, under the output lock)."""
    for path in Path(directory).glob(f"{_PREFIX}*"):
        if path.is_dir():
            log.info("removing the activation chains of an interrupted run: %s", path)
            shutil.rmtree(path, ignore_errors=True)


def chunk_rows(chain: Chain, batch_rows: int | None = None) -> Iterator[slice]:
    """Consecutive row slices of `chain`: `batch_rows` at a time, else about 64 MiB at a time (at least one row)."""
    n = chain.shape[0]
    row = math.prod(chain.shape[1:]) * _ITEMSIZE
    step = batch_rows if batch_rows else max(1, _CHUNK_BYTES // max(row, 1))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def to_device(chain: Chain, device: torch.device) -> Chain:
    """A whole chain for a stage that indexes it on `device`: a tensor is moved; a DiskChain stays on disk for the
    CPU (each batch is read when indexed) and is read chunk by chunk into one tensor on an accelerator, so the host
    never holds it whole."""
    if isinstance(chain, Tensor):
        return chain.to(device)
    if device.type == "cpu":
        return chain
    out = torch.empty(tuple(chain.shape), dtype=chain.dtype, device=device)
    for part in chunk_rows(chain):
        out[part] = chain[part].to(device)
    return out


# --- chains in a safetensors file (a streamed run's checkpoint), written and read chunk by chunk ---------------------


def save_chains(chains: dict[str, Chain], path: Path) -> None:
    """Write `chains` as one safetensors file (F32), chunk by chunk: to a temp name, then renamed."""
    header: dict[str, Any] = {}
    offset = 0
    for name, chain in chains.items():
        size = chain.numel() * _ITEMSIZE
        header[name] = {"dtype": "F32", "shape": list(chain.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    temp = path.with_name(f".{path.name}.partial")
    try:
        with io.FileIO(temp, "w") as file:
            _write_all(file, memoryview(struct.pack("<Q", len(text)) + text), 0)
            position = 8 + len(text)
            for chain in chains.values():
                for part in chunk_rows(chain):
                    data = chain[part].detach().contiguous()
                    _write_all(file, _bytes_of(data), position)
                    position += data.numel() * _ITEMSIZE
    except OSError as error:
        temp.unlink(missing_ok=True)
        raise _chain_error(error, path) from error
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    os.replace(temp, path)


def load_chains(path: Path, store: ChainStore) -> dict[str, Chain]:
    """The chains of a safetensors file of F32 tensors, read chunk by chunk into chains of `store`."""
    chains: dict[str, Chain] = {}
    try:
        with io.FileIO(path, "r") as file:
            size = os.fstat(file.fileno()).st_size
            length = struct.unpack("<Q", _read_bytes(file, 8, 0))[0]
            if length > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(_read_bytes(file, length, 8))
            start = 8 + length
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                shape = [int(v) for v in info["shape"]]
                if info["dtype"] != "F32" or end - begin != math.prod(shape) * _ITEMSIZE or start + end > size:
                    raise ValueError(f"tensor '{name}' is not a whole F32 chain")
                chain = chains[name] = store.new(shape)
                row = math.prod(shape[1:]) * _ITEMSIZE
                for part in chunk_rows(chain):
                    rows = torch.empty((part.stop - part.start, *shape[1:]), dtype=torch.float32)
                    _read_all(file, _bytes_of(rows), start + begin + part.start * row)
                    chain[part] = rows
    except (OSError, ValueError, KeyError, TypeError, struct.error) as error:
        raise LowbitError(
            f"checkpoint file '{path}' is damaged ({type(error).__name__}); delete it to resume from the block "
            "before, or re-run with --overwrite to start over"
        ) from error
    return chains


# --- explicit I/O ----------------------------------------------------------------------------------------------------


def _bytes_of(tensor: Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable, without a copy."""
    if tensor.numel() == 0:  # memoryview refuses to cast a shape with a zero
        return memoryview(bytearray())
    return memoryview(tensor.detach().numpy()).cast("B")


def _read_all(file: io.FileIO, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        file.seek(offset + done)
        count = file.readinto(view[done:])
        if not count:
            raise ValueError(f"'{file.name}' ends before byte {offset + len(view)}")
        done += count


def _read_bytes(file: io.FileIO, count: int, offset: int) -> bytes:
    data = bytearray(count)
    _read_all(file, memoryview(data), offset)
    return bytes(data)


def _write_all(file: io.FileIO, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        file.seek(offset + done)
        done += file.write(view[done:]) or 0


def _discard(file: io.FileIO, path: str) -> None:
    file.close()
    Path(path).unlink(missing_ok=True)


def _chain_error(error: OSError, path: Path) -> LowbitError | OSError:
    """A LowbitError naming the fix for a full disk, else the error itself."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return LowbitError(
            f"disk full while writing the activation chains to '{path.parent}': free some space there, or keep "
            "them in memory with --opt engine.offload=ram (or fewer --nsamples / a shorter --seqlen)"
        )
    return error
