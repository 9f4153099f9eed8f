"""Synthetic checkpoints of any size, written tensor by tensor: test and benchmark inputs for streaming.

A 7B or 70B checkpoint is needed to measure streaming but cannot be downloaded in CI or built in RAM. This writes
a real config.json and sharded safetensors with seeded random weights of a sensible scale (linears normal * 0.02,
norms near 1, or near 0 for Gemma's `1 + w` norms). The tensor names and shapes come from the model class built
on the meta device, mapped to checkpoint keys the way save_pretrained maps them (tied lm_head dropped, fused MoE
experts split per expert: engine/keymap.py), so transformers loads the result with no missing or unexpected
keys. The layout is planned from shapes first, so each shard's header is written before its data and only one
tensor is in memory at a time. Every tensor is drawn from its own seed (seed, key): same seed, same bytes.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lowbit.errors import LowbitError

logger = logging.getLogger(__name__)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "opt", "qwen3_moe")
_MODEL_TYPE = {"gemma3": "gemma3_text"}
_DTYPE_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "chat_template.jinja", "chat_template.json",
)  # fmt: skip


@dataclass(frozen=True)
class _Entry:
    key: str
    shape: tuple[int, ...]
    kind: str  # "weight" | "norm" | "norm0" (Gemma's 1 + w) | "bias"

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


def parse_size(text: str) -> int:
    """Bytes in a size like "2GB", "500MB", "4GiB" or a plain integer (save_pretrained's max_shard_size)."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit) and upper[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(upper[: -len(unit)]) * factor)
    if upper.isdigit():
        return int(upper)
    raise ValueError(f"not a size: {text!r} (e.g. 2GB, 500MB)")


def synthetic_config(
    family: str, *, hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
    vocab_size: int, dtype: torch.dtype, tie_word_embeddings: bool, overrides: dict[str, Any] | None = None,
) -> Any:  # fmt: skip
    """The transformers config of a synthetic `family` model (token ids kept inside the vocabulary)."""
    from transformers import AutoConfig

    if family not in FAMILIES:
        raise LowbitError(f"unknown synthetic family '{family}' (known: {', '.join(FAMILIES)})")
    model_type = _MODEL_TYPE.get(family, family)
    kwargs: dict[str, Any] = {
        "vocab_size": vocab_size, "hidden_size": hidden_size, "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads, "tie_word_embeddings": tie_word_embeddings,
        "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    }  # fmt: skip
    if model_type == "opt":
        if num_kv_heads != num_heads:
            raise LowbitError("OPT has no grouped-query attention: pass num_kv_heads == num_heads")
        kwargs.update(ffn_dim=intermediate_size, word_embed_proj_dim=hidden_size, enable_bias=True)
    else:
        kwargs.update(intermediate_size=intermediate_size, num_key_value_heads=num_kv_heads)
    if model_type != "opt" and model_type != "phi3":
        kwargs["head_dim"] = hidden_size // num_heads  # Qwen3 and Gemma default to 128 and 256, not hidden/heads
    if model_type.startswith("gemma"):
        kwargs["query_pre_attn_scalar"] = hidden_size // num_heads
    if model_type == "qwen3_moe":
        kwargs.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=intermediate_size)
    kwargs.update(overrides or {})
    config = AutoConfig.for_model(model_type, **kwargs)
    config.dtype = dtype
    return config


def _plan(config: Any) -> list[_Entry]:
    """Checkpoint keys, stored shapes and init kind, in module order, from the model built on meta."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from lowbit.arch import arch_for
    from lowbit.engine.keymap import KeyMap
    from lowbit.engine.skeleton import persistent_tensors, tied_output_name

    with init_empty_weights(include_buffers=True):
        model = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(model).__name__]
    keymap = KeyMap(arch_for(config))
    one_plus = config.model_type.startswith("gemma")
    modules = dict(model.named_modules())
    tied = tied_output_name(model)
    entries = []
    for name, tensor in persistent_tensors(model):
        if name == tied:
            continue
        owner = type(modules[name.rpartition(".")[0]]).__name__.lower()
        if tensor.dim() == 1 and "norm" in owner:
            kind = "bias" if name.endswith(".bias") else ("norm0" if one_plus else "norm")
        else:
            kind = "bias" if tensor.dim() == 1 else "weight"
        entries.extend(_Entry(key, shape, kind) for key, shape in keymap.sources(name, tuple(tensor.shape)))
    return entries


def _tensor(entry: _Entry, seed: int, dtype: torch.dtype) -> Tensor:
    """The seeded random value of one checkpoint tensor: its own generator, so order and layout do not matter."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{entry.key}".encode()))
    value = torch.randn(entry.shape, generator=generator).mul_(0.02)  # in place: one fp32 copy of the tensor
    if entry.kind == "norm":
        value.mul_(5).add_(1)
    elif entry.kind == "norm0":
        value.mul_(5)
    return value.to(dtype)


def _shards(entries: list[_Entry], itemsize: int, max_shard_bytes: int) -> list[list[_Entry]]:
    shards: list[list[_Entry]] = [[]]
    size = 0
    for entry in entries:
        nbytes = entry.numel * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _write_shard(file: Path, entries: list[_Entry], seed: int, dtype: torch.dtype) -> None:
    """One safetensors file: the header from the planned shapes, then each tensor generated and written in turn."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        size = entry.numel * itemsize
        header[entry.key] = {
            "dtype": _DTYPE_CODES[dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with file.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        for entry in entries:
            value = _tensor(entry, seed, dtype)
            handle.write(value.reshape(-1).view(torch.uint8).numpy())  # no extra copy
            del value


def write_synthetic_checkpoint(
    out_dir: str | Path, *, family: str = "llama", hidden_size: int, intermediate_size: int, num_layers: int,
    num_heads: int, num_kv_heads: int, vocab_size: int, dtype: torch.dtype = torch.bfloat16,
    tie_word_embeddings: bool = False, max_shard_bytes: int = 5 * 10**9, seed: int = 0,
    tokenizer_dir: str | Path | None = None, config_overrides: dict[str, Any] | None = None,
) -> Path:  # fmt: skip
    """Write a loadable `family` checkpoint with seeded random weights into `out_dir` (created; must hold no
    weights yet) and return it. `config_overrides` sets further config fields (e.g. num_experts for qwen3_moe)."""
    if dtype not in _DTYPE_CODES:
        raise LowbitError(f"synthetic checkpoints are float32, float16 or bfloat16, not {dtype}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.safetensors")):
        raise LowbitError(f"'{out}' already holds safetensors weights; pass an empty or new directory")
    config = synthetic_config(
        family, hidden_size=hidden_size, intermediate_size=intermediate_size, num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=num_kv_heads, vocab_size=vocab_size, dtype=dtype,
        tie_word_embeddings=tie_word_embeddings, overrides=config_overrides,
    )  # fmt: skip
    entries = _plan(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = _shards(entries, itemsize, max_shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    total = sum(entry.numel for entry in entries) * itemsize
    logger.info("writing a synthetic %s checkpoint (%.2f GB, %d shard(s)) to %s", family, total / 1e9, len(shards), out)
    for name, shard in zip(names, shards, strict=True):
        _write_shard(out / name, shard, seed, dtype)
        logger.debug("wrote %s (%d tensors)", name, len(shard))
    if len(shards) > 1:
        weight_map = {entry.key: name for name, shard in zip(names, shards, strict=True) for entry in shard}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=False) + "\n")
    config.to_json_file(out / "config.json", use_diff=True)
    if tokenizer_dir is not None:
        _copy_tokenizer(Path(tokenizer_dir), out)
    return out


def _copy_tokenizer(source: Path, out: Path) -> None:
    """Copy a tokenizer's files (not its model's weights or config) so the checkpoint is usable end to end."""
    copied = [name for name in _TOKENIZER_FILES if (source / name).is_file()]
    if not copied:
        raise LowbitError(f"'{source}' has no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...)")
    for name in copied:
        shutil.copyfile(source / name, out / name)
