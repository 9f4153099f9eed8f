"""Checks on a model directory before and after its weights are read (safe loading).

lowbit reads weights only from safetensors: a pickle checkpoint (pytorch_model.bin, *.pt, *.pth, *.ckpt) can run
arbitrary code when unpickled, and a config with `auto_map` asks to import code shipped with the model. Both are
refused unless the user accepts the risk with a flag. Every other problem that would otherwise surface as a
transformers traceback deep inside from_pretrained (garbled config, truncated safetensors, no tokenizer) is
turned into one LowbitError that names the file and the fix. Nothing here writes to the model directory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.txt",
    "tokenizer.tiktoken",
)
_ALLOW_PICKLE_HINT = (
    "convert them to safetensors (save_pretrained with safe_serialization), or pass --allow-pickle "
    "(allow_pickle=True) if you trust their source"
)
_REDOWNLOAD = "download the model again (or re-save it with save_pretrained)"


def safetensors_files(path: Path) -> list[Path]:
    """The safetensors weight files of a model directory (top level, as save_pretrained writes them)."""
    return sorted(p for p in path.glob("*.safetensors") if p.is_file())


def pickle_files(path: Path) -> list[Path]:
    """Weight files in pickle formats, which can run code when loaded."""
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def read_config(path: Path) -> dict[str, Any]:
    """config.json as a dict, or a LowbitError naming the file when it is not a JSON object."""
    config_file = path / "config.json"
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LowbitError(
            f"'{config_file}' is not valid JSON ({type(e).__name__}: {e}); restore it from the original model or "
            "download the model again"
        ) from None
    if not isinstance(data, dict):
        raise LowbitError(f"'{config_file}' is not a JSON object; restore it from the original model")
    return data


def check_config(path: Path, config: dict[str, Any], *, trust_remote_code: bool) -> None:
    """Refuse a config lowbit cannot build a model from, or one that needs the model's own code."""
    config_file = path / "config.json"
    if not config.get("architectures"):
        raise LowbitError(
            f"'{config_file}' has no 'architectures' entry, so the model class is unknown; add e.g. "
            '"architectures": ["LlamaForCausalLM"], or re-save the model with save_pretrained'
        )
    if "auto_map" in config and not trust_remote_code:
        raise LowbitError(
            f"model at '{path}' needs custom code from its repository (config.json has auto_map); lowbit runs no "
            "model-supplied code unless you pass --trust-remote-code (trust_remote_code=True) for a source you trust"
        )
    model_type = config.get("model_type")
    if not model_type:
        raise LowbitError(f"'{config_file}' has no 'model_type'; re-save the model with save_pretrained")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING and not trust_remote_code:
        import transformers

        raise LowbitError(
            f"model type '{model_type}' of '{path}' is not known to transformers {transformers.__version__}; "
            "upgrade transformers, or pass --trust-remote-code if the model ships its own code and you trust it"
        )


def check_tokenizer_files(path: Path, *, trust_remote_code: bool) -> None:
    """A quantized model is useless without its tokenizer: refuse a directory that has none."""
    if trust_remote_code or any((path / name).is_file() for name in TOKENIZER_FILES) or any(path.glob("*.tiktoken")):
        return
    raise LowbitError(
        f"model directory '{path}' has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); copy them from "
        "the original model into it (tokenizer.save_pretrained)"
    )


def check_weight_files(path: Path, *, allow_pickle: bool) -> None:
    """Safetensors present and intact, or pickle weights with explicit permission."""
    tensors = safetensors_files(path)
    if not tensors:
        pickles = pickle_files(path)
        if pickles and not allow_pickle:
            names = ", ".join(p.name for p in pickles[:3])
            raise LowbitError(
                f"model directory '{path}' has only pickle weights ({names}), which can run code when loaded; "
                + _ALLOW_PICKLE_HINT
            )
        if not pickles:
            raise LowbitError(f"model directory '{path}' has no weights (model.safetensors); {_REDOWNLOAD}")
        log.warning("loading pickle weights from %s (--allow-pickle): only do this for sources you trust", path)
        return
    _check_index(path)
    for file in tensors:
        _check_safetensors(path, file)


def _check_index(path: Path) -> None:
    """Every shard a sharded checkpoint's index names must be present."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise LowbitError(f"'{index}' is not a valid safetensors index ({type(e).__name__}); {_REDOWNLOAD}") from None
    missing = [name for name in shards if not (path / name).is_file()]
    if missing:
        raise LowbitError(f"model directory '{path}' is missing shard(s) {', '.join(missing[:3])}; {_REDOWNLOAD}")


def _check_safetensors(path: Path, file: Path) -> None:
    """Open the header: safetensors checks that it parses and that the file covers every tensor (truncation)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LowbitError(
            f"could not load the model checkpoint at '{path}': {file.name} is truncated or corrupt ({detail}); "
            + _REDOWNLOAD
        ) from None


def check_model_dir(path: Path, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> dict[str, Any]:
    """All checks that need no weights read: config, tokenizer files, weight files. Returns the config dict."""
    config = read_config(path)
    check_config(path, config, trust_remote_code=trust_remote_code)
    check_weight_files(path, allow_pickle=allow_pickle)
    check_tokenizer_files(path, trust_remote_code=trust_remote_code)
    return config


def check_finite_weights(model: nn.Module, path: Path) -> None:
    """Refuse NaN/Inf in any float parameter, naming the first one; a run on them would only produce garbage."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.is_floating_point() and not bool(torch.isfinite(param).all()):
                raise LowbitError(
                    f"weight '{name}' of the model at '{path}' contains NaN or Inf, so the checkpoint is damaged: "
                    "repair or re-download the checkpoint"
                )
