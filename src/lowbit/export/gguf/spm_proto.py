"""The few fields of a SentencePiece `tokenizer.model` that a GGUF vocabulary needs, read from the protobuf wire
format directly: the `sentencepiece` package's own `sentencepiece_model_pb2` needs `protobuf`, which lowbit does not
depend on, and these fields (pieces, the model type, the normalizer's flags) are a handful of varints and strings.

Field numbers are those of sentencepiece's `sentencepiece_model.proto` (proto2, so an absent field has its default).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError

# TrainerSpec.ModelType
UNIGRAM, BPE, WORD, CHAR = 1, 2, 3, 4
MODEL_TYPES = {UNIGRAM: "unigram", BPE: "bpe", WORD: "word", CHAR: "char"}
# SentencePiece.Type: the same numbers as gguf.TokenType (NORMAL 1 ... BYTE 6)
NORMAL = 1


@dataclass(frozen=True)
class SpmModel:
    """A parsed `tokenizer.model`: piece i is token id i."""

    pieces: list[str]
    scores: list[float]
    types: list[int]
    model_type: int
    byte_fallback: bool
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data):
            raise LowbitError("tokenizer.model is truncated: it is not a SentencePiece model")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) for each field of one message: an int for varints, bytes for everything else."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            yield number, value
        elif wire == 2:
            size, pos = _varint(data, pos)
            yield number, data[pos : pos + size]
            pos += size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            yield number, data[pos : pos + width]
            pos += width
        else:
            raise LowbitError(f"tokenizer.model has protobuf wire type {wire}: it is not a SentencePiece model")


def parse_spm(data: bytes) -> SpmModel:
    """The pieces (text, score, type), the model type and the normalizer flags of a serialized ModelProto."""
    pieces: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    model_type, byte_fallback = UNIGRAM, False
    add_dummy_prefix, remove_extra_whitespaces = True, True
    for number, value in _fields(data):
        if number == 1 and isinstance(value, bytes):  # repeated SentencePiece pieces
            piece, score, kind = "", 0.0, NORMAL
            for field, item in _fields(value):
                if field == 1 and isinstance(item, bytes):
                    piece = item.decode("utf-8")
                elif field == 2 and isinstance(item, bytes):
                    score = struct.unpack("<f", item)[0]
                elif field == 3 and isinstance(item, int):
                    kind = item
            pieces.append(piece)
            scores.append(score)
            types.append(kind)
        elif number == 2 and isinstance(value, bytes):  # TrainerSpec
            for field, item in _fields(value):
                if field == 3 and isinstance(item, int):
                    model_type = item
                elif field == 35 and isinstance(item, int):
                    byte_fallback = bool(item)
        elif number == 3 and isinstance(value, bytes):  # NormalizerSpec
            for field, item in _fields(value):
                if field == 3 and isinstance(item, int):
                    add_dummy_prefix = bool(item)
                elif field == 4 and isinstance(item, int):
                    remove_extra_whitespaces = bool(item)
    if not pieces:
        raise LowbitError("tokenizer.model holds no pieces: it is not a SentencePiece model")
    return SpmModel(pieces, scores, types, model_type, byte_fallback, add_dummy_prefix, remove_extra_whitespaces)


def read_spm(path: Path) -> SpmModel:
    """Parse `path` (a SentencePiece `tokenizer.model`)."""
    return parse_spm(path.read_bytes())
