"""Read a safetensors checkpoint a few tensors at a time, so a model larger than memory can stream from disk.

`CheckpointReader` knows every tensor's shard, dtype and shape from the shard headers alone (no weights read).
`read` groups the requested keys by shard and opens each shard only for that read: a kept mmap would leave the
file's touched pages resident (the pitfall auto-round's disk streaming documents), so reads use safetensors'
`pread` backend where it exists (0.8+: a fresh buffer per tensor, no mapping) and otherwise clone every tensor
before the shard closes. Pickle (`.bin`) checkpoints cannot be read lazily and are refused.
"""

from __future__ import annotations

import json
import logging
import struct
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from lowbit.errors import LowbitError

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_CONVERT_HINT = (
    "streaming reads tensors lazily and needs safetensors: convert once with "
    "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir)` (safetensors is the default), "
    "or load the model resident instead"
)
_pread: bool | None = None  # whether this safetensors has backend="pread" (detected on first open)


def read_header(file: Path) -> dict[str, dict]:
    """The tensor entries of a safetensors header (dtype, shape, data_offsets), read without touching the data."""
    try:
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise LowbitError(
            f"'{file}' is not a readable safetensors file ({type(e).__name__}); download the model again"
        ) from None
    header.pop("__metadata__", None)
    return header


def _open(file: Path):
    """safe_open without a long-lived mapping: pread where supported (detected once)."""
    global _pread
    from safetensors import safe_open

    if _pread is not False:
        try:
            handle = safe_open(str(file), framework="pt", device="cpu", backend="pread")
            _pread = True
            return handle
        except TypeError:
            _pread = False
            logger.debug("safetensors has no pread backend: reading through mmap and cloning each tensor")
    return safe_open(str(file), framework="pt", device="cpu")


class CheckpointReader:
    """Lazy access to the tensors of a Hugging Face safetensors checkpoint directory (sharded or single-file).

    `base_model_prefix` (e.g. "model") lets callers ask for the model's own names when the checkpoint was saved
    from the bare base model (keys without "model."), the mismatch transformers also tolerates.
    """

    def __init__(self, directory: str | Path, *, base_model_prefix: str | None = None) -> None:
        self.directory = Path(directory)
        self.weight_map = self._weight_map()
        self._headers: dict[str, dict] = {}
        for shard in sorted(set(self.weight_map.values())):
            header = read_header(self.directory / shard)
            self._headers.update({k: v for k, v in header.items() if self.weight_map.get(k) == shard})
        self.strip_prefix = ""
        if base_model_prefix:
            prefix = f"{base_model_prefix}."
            if not any(k.startswith(prefix) for k in self.weight_map):
                self.strip_prefix = prefix
                logger.info("checkpoint at %s has no '%s' prefix: reading the base model's keys", directory, prefix)

    def _weight_map(self) -> dict[str, str]:
        index, single = self.directory / INDEX_FILE, self.directory / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise LowbitError(f"'{index}' is not a valid safetensors index ({type(e).__name__})") from None
            missing = sorted({s for s in weight_map.values() if not (self.directory / s).is_file()})
            if missing:
                raise LowbitError(
                    f"checkpoint '{self.directory}' is missing shard(s) {', '.join(missing[:3])} named by "
                    f"{INDEX_FILE}; download the model again"
                )
            return dict(weight_map)
        if single.is_file():
            return {key: SINGLE_FILE for key in read_header(single)}
        shards = sorted(self.directory.glob("*.safetensors"))
        if len(shards) == 1:
            return {key: shards[0].name for key in read_header(shards[0])}
        if shards:
            raise LowbitError(f"checkpoint '{self.directory}' has {len(shards)} safetensors files but no {INDEX_FILE}")
        if any(self.directory.glob("*.bin")) or any(self.directory.glob("*.pt")):
            raise LowbitError(f"checkpoint '{self.directory}' has only pickle weights (.bin); {_CONVERT_HINT}")
        raise LowbitError(f"checkpoint '{self.directory}' has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE})")

    def key_for(self, name: str) -> str:
        """The checkpoint key that holds the model tensor `name` (identity unless the base-model prefix differs)."""
        if self.strip_prefix and name.startswith(self.strip_prefix):
            return name[len(self.strip_prefix) :]
        return name

    def has(self, name: str) -> bool:
        """Whether the checkpoint holds `name` (a model-side name)."""
        return self.key_for(name) in self.weight_map

    def keys(self) -> list[str]:
        """Every tensor key in the checkpoint, as stored."""
        return list(self.weight_map)

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)

    def __len__(self) -> int:
        return len(self.weight_map)

    def shard_of(self, name: str) -> str:
        """The shard file holding `name`."""
        return self.weight_map[self._require(name)]

    def dtype_of(self, name: str) -> torch.dtype:
        """The at-rest dtype of `name`."""
        code = self._headers[self._require(name)]["dtype"]
        if code not in SAFETENSORS_DTYPES:
            raise LowbitError(f"tensor '{name}' has dtype {code}, which lowbit cannot stream")
        return SAFETENSORS_DTYPES[code]

    def shape_of(self, name: str) -> tuple[int, ...]:
        """The stored shape of `name`."""
        return tuple(self._headers[self._require(name)]["shape"])

    def nbytes_of(self, name: str) -> int:
        """The stored size of `name` in bytes."""
        start, end = self._headers[self._require(name)]["data_offsets"]
        return int(end) - int(start)

    def bytes_by_dtype(self) -> dict[torch.dtype, int]:
        """Stored bytes per dtype over the whole checkpoint (its at-rest precision, from the headers alone)."""
        sizes: dict[torch.dtype, int] = defaultdict(int)
        for entry in self._headers.values():
            start, end = entry["data_offsets"]
            sizes[SAFETENSORS_DTYPES.get(entry["dtype"], torch.uint8)] += int(end) - int(start)
        return dict(sizes)

    def read(self, names: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The tensors `names` (model-side names), each owning its memory; float ones converted to `dtype`."""
        names = list(dict.fromkeys(names))
        by_shard: dict[str, list[str]] = defaultdict(list)
        for name in names:
            by_shard[self.weight_map[self._require(name)]].append(name)
        out: dict[str, Tensor] = {}
        for shard, shard_names in by_shard.items():
            with _open(self.directory / shard) as handle:
                for name in shard_names:
                    tensor = handle.get_tensor(self.key_for(name))
                    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                        tensor = tensor.to(dtype)
                    elif not _pread:
                        tensor = tensor.clone()  # detach from the mapping before the shard closes
                    out[name] = tensor
        return {name: out[name] for name in names}

    def _require(self, name: str) -> str:
        key = self.key_for(name)
        if key in self.weight_map:
            return key
        raise LowbitError(
            f"checkpoint '{self.directory}' has no tensor '{key}'{self._expected_shard(key)}; the checkpoint is "
            "incomplete or was saved for another architecture or config: download it again, or re-save it with "
            "save_pretrained from a model that loads"
        )

    def _expected_shard(self, key: str) -> str:
        """Where `key` should have been: the shard(s) holding its module's siblings (the longest shared prefix)."""
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut]) + "."
            shards = sorted({s for k, s in self.weight_map.items() if k.startswith(prefix)})
            if shards:
                return f" (expected in {' or '.join(shards)}, which holds the rest of '{prefix[:-1]}')"
        return ""
