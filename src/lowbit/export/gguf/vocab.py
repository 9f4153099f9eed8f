"""Tokenizer metadata for GGUF from a Hugging Face fast tokenizer: vocabulary, merges, token types, special ids,
pre-tokenizer name and chat template (the keys llama.cpp's `llama-vocab.cpp` and transformers' GGUF loader read).

Byte-level BPE vocabularies (GPT-2 style: SmolLM2, Llama 3, most small Llama-like models) are written here, with
the pre-tokenizer name recognised from the tokenizer's own pre-tokenizer settings (llama.cpp refuses an unknown
name); SentencePiece BPE vocabularies (Gemma, Llama 2) in `vocab_spm`. Anything else is refused before calibration
(`vocab_problem`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import gguf

from lowbit.errors import LowbitError
from lowbit.export.gguf.vocab_spm import build_spm_vocab, is_spm_json, spm_problem

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2 / Qwen3's split: Llama 3's with single digits (llama.cpp's "qwen2" pre-tokenizer)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_SPLITS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


@dataclass(frozen=True)
class GgufVocab:
    """Everything the writer adds under `tokenizer.*`: `model` "gpt2" (byte-level BPE, with merges) or "llama"
    (SentencePiece, with scores and add_space_prefix)."""

    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]  # bos / eos / unk / pad / mask -> id
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    model: str = "gpt2"
    scores: list[float] | None = None
    add_space_prefix: bool | None = None


def _backend(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LowbitError(
            f"GGUF export needs a fast (tokenizers) tokenizer, this model has {type(tokenizer).__name__}: use "
            "--format compressed-tensors"
        )
    return json.loads(backend.to_str())


def _pre_name(pre: dict[str, Any] | None) -> str | None:
    """llama.cpp's pre-tokenizer name for the tokenizer's own pre-tokenizer settings, or None when unknown."""
    if pre is None:
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    kinds = [step.get("type") for step in steps]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        return _SPLITS.get(steps[0].get("pattern", {}).get("Regex"))
    return None


def vocab_problem(tokenizer: Any) -> str | None:
    """Why this tokenizer cannot be written as GGUF metadata, or None."""
    if tokenizer is None:
        return "GGUF files carry the tokenizer, but this run has none: load the model from a directory with one"
    try:
        data = _backend(tokenizer)
    except LowbitError as error:
        return str(error)
    if is_spm_json(data):
        return spm_problem(tokenizer, data)
    model = data.get("model", {})
    if model.get("type") != "BPE" or data.get("decoder", {}) is None or data["decoder"].get("type") != "ByteLevel":
        return (
            f"GGUF export writes byte-level BPE and SentencePiece BPE tokenizers only, not {model.get('type')} "
            f"(byte fallback {bool(model.get('byte_fallback'))}) with decoder "
            f"{(data.get('decoder') or {}).get('type')}: use --format compressed-tensors"
        )
    if _pre_name(data.get("pre_tokenizer")) is None:
        return (
            "the tokenizer's pre-tokenizer is not one lowbit can name for llama.cpp (gpt-2, smollm, llama-bpe, qwen2): "
            "use --format compressed-tensors"
        )
    return None


def _adds(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding a text adds BOS first / EOS last (llama.cpp's add_bos/add_eos flags)."""
    ids = tokenizer("a").input_ids
    return (bool(ids) and ids[0] == tokenizer.bos_token_id, bool(ids) and ids[-1] == tokenizer.eos_token_id)


def _special_ids(tokenizer: Any) -> dict[str, int]:
    ids = {key: getattr(tokenizer, f"{key}_token_id", None) for key in ("bos", "eos", "unk", "pad", "mask")}
    return {key: int(value) for key, value in ids.items() if isinstance(value, int)}


def _chat_template(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) else None


def build_vocab(tokenizer: Any, vocab_size: int) -> GgufVocab:
    """The tokenizer metadata, padded with `[PAD<i>]` (UNUSED) tokens up to the model's embedding rows."""
    problem = vocab_problem(tokenizer)
    if problem:
        raise LowbitError(problem)
    data = _backend(tokenizer)
    add_bos, add_eos = _adds(tokenizer)
    if is_spm_json(data):
        spm = build_spm_vocab(tokenizer, data, vocab_size)
        return GgufVocab(
            pre="default",
            tokens=spm.tokens,
            token_types=spm.token_types,
            merges=[],
            special_ids=_special_ids(tokenizer),
            add_bos=add_bos,
            add_eos=add_eos,
            chat_template=_chat_template(tokenizer),
            model="llama",
            scores=spm.scores,
            add_space_prefix=spm.add_space_prefix,
        )
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    size = max(vocab_size, max(by_id) + 1)
    added = {entry["id"]: entry for entry in data.get("added_tokens", [])}
    tokens, types = [], []
    for index in range(size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[index])
        entry = added.get(index)
        if entry is None:
            types.append(gguf.TokenType.NORMAL)
        else:
            types.append(gguf.TokenType.CONTROL if entry.get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    return GgufVocab(
        pre=_pre_name(data.get("pre_tokenizer")) or "default",
        tokens=tokens,
        token_types=[int(t) for t in types],
        merges=merges,
        special_ids=_special_ids(tokenizer),
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=_chat_template(tokenizer),
    )


def add_vocab(writer: gguf.GGUFWriter, vocab: GgufVocab) -> None:
    """Write the `tokenizer.*` keys."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.token_types)
    if vocab.model == "gpt2":
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
        "mask": writer.add_mask_token_id,
    }
    for key, token_id in vocab.special_ids.items():
        adders[key](int(token_id))
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
