"""Calibration and evaluation text from the user's own file (.txt, .jsonl, .json): parsed into documents and split
at a document boundary, so no document is in both the calibration and the evaluation part."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.errors import LowbitError

LOCAL_SUFFIXES = (".txt", ".jsonl", ".json")
LOCAL_CALIBRATION_FRACTION = 0.9


def read_local_documents(path: Path) -> list[str]:
    """Documents of a .txt (blank-line separated), .jsonl ("text" per line) or .json file."""
    if not path.is_file():
        raise LowbitError(f"dataset file '{path}' does not exist or is not a file; pass an existing file")
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise LowbitError(f"dataset file '{path}' has an unsupported type '{suffix}'; use .txt, .jsonl or .json")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LowbitError(f"dataset file '{path}' is not UTF-8 text; convert it to UTF-8") from e
    parse: Callable[[str, Path], list[str]] = {
        ".txt": _parse_txt,
        ".jsonl": _parse_jsonl,
        ".json": _parse_json,
    }[suffix]
    documents = [d for d in parse(content, path) if d.strip()]
    if not documents:
        raise LowbitError(f"dataset file '{path}' contains no text; pass a file with at least two documents")
    return documents


def _parse_txt(content: str, path: Path) -> list[str]:
    return [block.strip() for block in re.split(r"\n[ \t\r\f\v]*\n", content)]


def _parse_jsonl(content: str, path: Path) -> list[str]:
    documents = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LowbitError(f"{path}:{number} is not valid JSON ({e.msg}); write one JSON object per line") from e
        documents.append(_text_field(row, f"{path}:{number}"))
    return documents


def _parse_json(content: str, path: Path) -> list[str]:
    try:
        rows = json.loads(content)
    except json.JSONDecodeError as e:
        raise LowbitError(f"dataset file '{path}' is not valid JSON ({e.msg}); fix it or use .txt") from e
    if not isinstance(rows, list):
        raise LowbitError(f"dataset file '{path}' must hold a JSON list of strings or of objects with a \"text\" field")
    return [row if isinstance(row, str) else _text_field(row, f"{path} item {i}") for i, row in enumerate(rows)]


def _text_field(row: Any, where: str) -> str:
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise LowbitError(f'{where} has no string "text" field; give every record a "text" field')
    return row["text"]


def split_documents(documents: Sequence[str], fraction: float = LOCAL_CALIBRATION_FRACTION) -> int:
    """Number of leading documents for calibration: the document boundary nearest `fraction` of the chars."""
    if len(documents) < 2:
        raise ValueError("need at least two documents to split")
    total = sum(len(d) for d in documents)
    cumulative = np.cumsum([len(d) for d in documents])[:-1]  # chars before boundary k+1, k = 0..n-2
    best = int(np.argmin(np.abs(cumulative - fraction * total)))
    return best + 1


def local_split(path: Path) -> tuple[dict[str, list[str]], dict]:
    """One file serves both roles: the first ~90% of its characters calibrate, the last ~10% evaluate."""
    documents = read_local_documents(path)
    if len(documents) < 2:
        raise LowbitError(
            f"dataset file '{path}' holds one document, which cannot be split into calibration and "
            "evaluation text; separate documents with blank lines (.txt) or use one record per document"
        )
    k = split_documents(documents)
    calibration, evaluation = documents[:k], documents[k:]
    meta = {
        "name": "local",
        "source": str(path.resolve()),
        "file_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "split": (
            f"documents [0, {k}) for calibration, [{k}, {len(documents)}) for evaluation "
            f"(boundary nearest {LOCAL_CALIBRATION_FRACTION:.0%} of the characters)"
        ),
        "n_documents": len(documents),
        "calibration_documents": k,
        "eval_documents": len(evaluation),
        "calibration_chars": sum(map(len, calibration)),
        "eval_chars": sum(map(len, evaluation)),
    }
    return {"calibration": calibration, "eval": evaluation}, meta
