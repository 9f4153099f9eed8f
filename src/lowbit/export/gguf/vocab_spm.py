"""SentencePiece vocabularies for GGUF (`tokenizer.ggml.model = "llama"`: Gemma, Llama 2, Phi-3 mini), written the
way llama.cpp's `convert_hf_to_gguf.py` (`_set_vocab_sentencepiece`) writes them: every piece with its score and
type, the tokenizer's added tokens on top (CONTROL when special or special-looking, else USER_DEFINED with "▁"
written as a space, since llama.cpp matches those in the raw text), `[PAD<i>]` UNUSED rows up to the embedding
size, and `add_space_prefix` (llama.cpp's sentencepiece tokenizer prepends a space unless told not to).

Pieces, scores and types come from `tokenizer.model` when the model directory has one (the scores llama.cpp merges
by). Otherwise they come from the fast tokenizer's BPE with byte fallback, which is what transformers writes for
Gemma (also when it converts a GGUF): its merges are ranked best-first, so a piece's score is minus the rank of the
first merge that makes it, and llama.cpp's merge-highest-score-first then merges in the tokenizer's order.

Unigram models are refused: llama.cpp's "llama" tokenizer merges pairs by score, which is not a Unigram
segmentation (llama.cpp runs those as "t5", which lowbit does not write).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from lowbit.errors import LowbitError
from lowbit.export.gguf.spm_proto import BPE, MODEL_TYPES, SpmModel, read_spm

log = logging.getLogger(__name__)

SPM_FILE = "tokenizer.model"
SPACE = "\u2581"  # "▁", sentencepiece's escaped space
ADDED_SCORE = -1000.0  # llama.cpp's converter: the score of every added token
PAD_SCORE = -10000.0  # ... and of the [PAD<i>] rows between the tokenizer's last id and the embedding's
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_REFUSED = "use --format compressed-tensors"


@dataclass(frozen=True)
class SpmVocab:
    """What the "llama" tokenizer model adds beyond the special ids: one entry per token id."""

    tokens: list[str]
    scores: list[float]
    token_types: list[int]
    add_space_prefix: bool


def is_spm_json(data: dict[str, Any]) -> bool:
    """Whether a tokenizer.json is sentencepiece-style (BPE with byte fallback, or Unigram), not byte-level BPE."""
    model = data.get("model", {})
    return model.get("type") == "Unigram" or (model.get("type") == "BPE" and bool(model.get("byte_fallback")))


def _steps(step: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    if step is None:
        return []
    return list(step.get(key, [])) if step.get("type") == "Sequence" else [step]


def _space_prefix(data: dict[str, Any]) -> bool | str:
    """Whether the tokenizer puts "▁" before a text (llama.cpp's add_space_prefix), or what lowbit cannot map."""
    prefix = escaped = False
    for step in _steps(data.get("normalizer"), "normalizers"):
        kind = step.get("type")
        if kind == "Prepend" and step.get("prepend") == SPACE:
            prefix = True
        elif kind == "Replace" and step.get("pattern", {}).get("String") == " " and step.get("content") == SPACE:
            escaped = True
        else:
            return f"normalizer {kind} (llama.cpp's sentencepiece tokenizer applies none)"
    for step in _steps(data.get("pre_tokenizer"), "pretokenizers"):
        kind = step.get("type")
        if kind == "Metaspace" and step.get("replacement") == SPACE and not step.get("split", True):
            scheme = step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never")
            prefix, escaped = prefix or scheme != "never", True
        elif not (kind == "Split" and escaped and step.get("pattern", {}).get("String") == " "):
            # Gemma's Split at " " runs after every " " became "▁", so it splits nothing; anything else splits
            return f"pre-tokenizer {kind} (llama.cpp's sentencepiece tokenizer does not split the text)"
    if not escaped:
        return "a tokenizer that does not write spaces as '▁'"
    return prefix


def spm_file(tokenizer: Any) -> Path | None:
    """The model's `tokenizer.model`, when the tokenizer was loaded from a directory that has one."""
    candidates = [getattr(tokenizer, "vocab_file", None)]
    name = str(getattr(tokenizer, "name_or_path", "") or "")
    if name:
        candidates.append(str(Path(name) / SPM_FILE))
    for candidate in candidates:
        if candidate and str(candidate).endswith(".model") and Path(candidate).is_file():
            return Path(candidate)
    return None


def spm_problem(tokenizer: Any, data: dict[str, Any]) -> str | None:
    """Why this sentencepiece-style tokenizer cannot be written as a GGUF "llama" vocabulary, or None."""
    model_type = data.get("model", {}).get("type")
    path = spm_file(tokenizer)
    if path is not None:
        try:
            kind = read_spm(path).model_type
        except LowbitError as error:
            return f"{path}: {error}"
        model_type = "BPE" if kind == BPE else MODEL_TYPES.get(kind, str(kind))
    if model_type != "BPE":
        return (
            f"this SentencePiece tokenizer is {model_type}, and GGUF export writes SentencePiece BPE only "
            f"(llama.cpp's 'llama' tokenizer merges pairs by score, which is not a {model_type} segmentation): "
            f"{_REFUSED}"
        )
    prefix = _space_prefix(data)
    if isinstance(prefix, str):
        return f"the SentencePiece tokenizer has {prefix}, which GGUF cannot describe: {_REFUSED}"
    return None


def _looks_special(token: str) -> bool:
    """llama.cpp's `does_token_look_special`: added tokens that some models (Gemma) forget to mark special."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _from_model(spm: SpmModel, by_id: dict[int, str], added: set[int]) -> dict[int, tuple[str, float, int]]:
    """Piece, score and type per id from `tokenizer.model`, checked against the tokenizer lowbit evaluated."""
    entries = {}
    for index, (piece, score, kind) in enumerate(zip(spm.pieces, spm.scores, spm.types, strict=True)):
        if index not in added and by_id.get(index, piece) != piece:
            raise LowbitError(
                f"tokenizer.model's piece {index} is {piece!r}, the tokenizer's token {index} is {by_id[index]!r}: "
                "they are not one vocabulary; remove the stale tokenizer.model or use --format compressed-tensors"
            )
        entries[index] = (piece, float(score), kind)
    return entries


def _from_bpe(model: dict[str, Any], by_id: dict[int, str]) -> dict[int, tuple[str, float, int]]:
    """Piece, score and type per id from a BPE with byte fallback: the score is minus the rank of the first merge
    that makes the piece, so llama.cpp's highest-score-first merging follows the merge order; a piece no merge makes
    scores below every merge (a single character or byte is never a merge's result in llama.cpp either)."""
    merges = model.get("merges", [])
    ranks: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        ranks.setdefault(left + right, rank)
    unk = model.get("unk_token")
    entries = {}
    for index, token in by_id.items():
        if _BYTE_TOKEN.fullmatch(token):
            kind = gguf.TokenType.BYTE
        elif token == unk:
            kind = gguf.TokenType.UNKNOWN
        else:
            kind = gguf.TokenType.NORMAL
        score = -float(ranks[token]) if token in ranks else -float(len(merges))
        entries[index] = (token, score if len(token) > 1 and kind == gguf.TokenType.NORMAL else 0.0, int(kind))
    return entries


def build_spm_vocab(tokenizer: Any, data: dict[str, Any], vocab_size: int) -> SpmVocab:
    """The "llama" vocabulary: pieces (tokenizer.model or tokenizer.json), added tokens over them, padding rows."""
    problem = spm_problem(tokenizer, data)
    if problem:
        raise LowbitError(problem)
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = {entry["id"]: entry for entry in data.get("added_tokens", [])}
    path = spm_file(tokenizer)
    if path is not None:
        log.info("GGUF vocabulary: pieces and scores from %s", path)
        entries = _from_model(read_spm(path), by_id, set(added))
    else:
        entries = _from_bpe(data["model"], {i: t for i, t in by_id.items() if i not in added})
    for index, token in by_id.items():  # tokenizer ids beyond tokenizer.model's pieces
        entries.setdefault(index, (token, ADDED_SCORE, int(gguf.TokenType.USER_DEFINED)))
    for index, entry in added.items():
        text = entry["content"]
        if entry.get("special") or _looks_special(text):
            entries[index] = (text, ADDED_SCORE, int(gguf.TokenType.CONTROL))
        else:
            entries[index] = (text, ADDED_SCORE, int(gguf.TokenType.USER_DEFINED))
    size = max(vocab_size, max(entries) + 1)
    tokens, scores, types = [], [], []
    for index in range(size):
        token, score, kind = entries.get(index, (f"[PAD{index}]", PAD_SCORE, int(gguf.TokenType.UNUSED)))
        if kind == gguf.TokenType.USER_DEFINED:
            token = token.replace(SPACE, " ")  # llama.cpp matches user-defined tokens in the text, before escaping
        tokens.append(token)
        scores.append(score)
        types.append(kind)
    prefix = _space_prefix(data)
    return SpmVocab(tokens, scores, types, bool(prefix))
