"""Calibration and evaluation text, tokenized.

Sources: hub datasets through the optional `datasets` package (pile-10k, wikitext2, c4, ptb), a local
text file, or text the machine already has (`lowbit.offline_text`): "builtin", the documentation topics that
ship with CPython, and "licenses", the license texts Debian installs; both work with no network and need no
prose committed to this repository. Every source is split so
that calibration and evaluation text never overlap, and every result carries a meta dict (source, split,
sizes, SHA-256 of the token ids) for the run record.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlparse

import torch

from lowbit.errors import LowbitError, first_line
from lowbit.local_text import local_split, read_local_documents, split_documents  # noqa: F401 (public here)
from lowbit.offline_text import builtin_meta, builtin_split, licenses_documents
from lowbit.windows import (
    C4_EVAL_SEED,
    C4_EVAL_WINDOWS,
    EVAL_SEQLEN,
    c4_eval_windows,
    ids_sha256,
    sample_documents,
    sample_random_windows,
    sample_stream_windows,
    tokenize_stream,
    with_leading_bos,
)

logger = logging.getLogger(__name__)

HUB_DATASETS = ("pile-10k", "wikitext2", "c4", "ptb")
OFFLINE_DATASETS = ("builtin", "licenses")
NAMES = ("auto", *OFFLINE_DATASETS, *HUB_DATASETS)
HUB_CHECK_TIMEOUT_S = 2.0

_INSTALL_HINT = "install lowbit[hub] (pip install 'lowbit[hub]'), pass a local .txt/.jsonl/.json file, or use 'builtin'"


@dataclass
class CalibrationData:
    """nsamples x seqlen token rows for calibration, with where they came from."""

    input_ids: torch.LongTensor  # [nsamples, seqlen]
    meta: dict


@dataclass
class EvalData:
    """The whole evaluation token stream, to be cut into windows by the perplexity code."""

    input_ids: torch.LongTensor  # [1, N]
    meta: dict


# --- public entry points ---------------------------------------------------------------------------


def load_calibration(
    tokenizer: Any, dataset: str | None, *, nsamples: int, seqlen: int, seed: int, bos_id: int | None = None
) -> CalibrationData:
    """Deterministic calibration rows from `dataset` (name, local file, "auto" or None).

    With `bos_id` (families that need a leading BOS, `lowbit.arch.window_bos_id`) every row starts with it: a row
    that does not is shifted right by one (its last token dropped), so the selection is the protocol's."""
    if nsamples < 1 or seqlen < 1:
        raise LowbitError(
            f"calibration needs nsamples >= 1 and seqlen >= 1 (got {nsamples} and {seqlen}); "
            "pass positive --nsamples/--seqlen"
        )
    documents, meta = calibration_documents(dataset)
    name = meta["name"]
    label = meta["source"] if name == "local" else name
    if name == "pile-10k":
        ids, sampling = sample_documents(tokenizer, documents, nsamples=nsamples, seqlen=seqlen, seed=seed, name=label)
    elif name == "c4":
        ids, sampling = sample_random_windows(
            tokenizer, documents, nsamples=nsamples, seqlen=seqlen, seed=seed, name=label
        )
    else:
        stream = tokenize_stream(tokenizer, "\n\n".join(documents))
        ids, sampling = sample_stream_windows(stream, nsamples=nsamples, seqlen=seqlen, seed=seed, name=label)
    if bos_id is not None:
        ids = with_leading_bos(ids, bos_id)
    meta = {
        **meta,
        **sampling,
        "bos_first": bos_id is not None,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
        "tokenizer": type(tokenizer).__name__,
        "sha256": ids_sha256(ids),
    }
    logger.info("calibration data: %s, %d x %d tokens (%s)", name, nsamples, seqlen, meta["mode"])
    return CalibrationData(input_ids=ids, meta=meta)


def eval_label(dataset: str, meta: dict) -> str:
    """The key a perplexity result is reported under: the dataset's own name ("builtin", "wikitext2"), or for a
    local file the path as the user gave it, so that two local files in one evaluation stay apart."""
    name = meta.get("name", dataset)
    return dataset if name == "local" else name


def load_eval(tokenizer: Any, dataset: str | None) -> EvalData:
    """The evaluation token stream [1, N] of `dataset`, assembled as the reference protocol says."""
    name = resolve_name(dataset, role="eval")
    if name == "c4":
        documents, meta = _hub_documents("c4", role="eval")
        ids = c4_eval_windows(tokenizer, documents)
        meta["assembly"] = (
            f"{C4_EVAL_WINDOWS} windows of {EVAL_SEQLEN} tokens: Python random seeded {C4_EVAL_SEED} draws "
            f"documents until one has more than {EVAL_SEQLEN} tokens, then a random start (GPTQ protocol)"
        )
        bos_added = None
    else:
        text, meta = eval_text(name)
        ids = tokenize_stream(tokenizer, text)
        bos_id = getattr(tokenizer, "bos_token_id", None)
        bos_added = bool(ids.numel()) and bos_id is not None and int(ids[0, 0]) == bos_id
        meta["assembly"] += "; tokenized once with the tokenizer's default special tokens"
    meta = {
        **meta,
        "n_tokens": int(ids.shape[1]),
        "bos_added": bos_added,
        "tokenizer": type(tokenizer).__name__,
        "sha256": ids_sha256(ids),
    }
    logger.info("evaluation data: %s, %d tokens", meta["name"], meta["n_tokens"])
    return EvalData(input_ids=ids, meta=meta)


def calibration_documents(name: str | None) -> tuple[Sequence[str], dict]:
    """The calibration documents of a dataset (never overlapping its evaluation text) and their meta."""
    resolved = resolve_name(name, role="calibration")
    if resolved == "builtin":
        calibration, _ = builtin_split()
        return calibration, builtin_meta("calibration", len(calibration))
    if resolved == "licenses":
        return licenses_documents("calibration")
    if resolved in HUB_DATASETS:
        return _hub_documents(resolved, role="calibration")
    documents, meta = local_split(Path(resolved).expanduser())
    return documents["calibration"], meta


def eval_text(name: str | None) -> tuple[str, dict]:
    """The evaluation text of a dataset whose protocol joins documents into one string (all but c4)."""
    resolved = resolve_name(name, role="eval")
    if resolved == "builtin":
        _, evaluation = builtin_split()
        meta = builtin_meta("eval", len(evaluation))
        documents: Sequence[str] = evaluation
    elif resolved == "licenses":
        documents, meta = licenses_documents("eval")
    elif resolved == "c4":
        raise ValueError("c4 evaluation is assembled from token windows, not one text; use load_eval")
    elif resolved in HUB_DATASETS:
        documents, meta = _hub_documents(resolved, role="eval")
    else:
        split, meta = local_split(Path(resolved).expanduser())
        documents = split["eval"]
    meta["assembly"] = 'documents joined with "\\n\\n"'
    return "\n\n".join(documents), meta


def resolve_name(dataset: str | None, *, role: str) -> str:
    """Normalise a dataset argument: a known name (lower case) or a local path; resolves "auto"."""
    if dataset is None or dataset.strip().lower() == "auto":
        return _auto_name(role)
    key = dataset.strip().lower()
    if key in NAMES:
        return key
    path = Path(dataset).expanduser()
    if not path.exists():
        raise LowbitError(
            f"dataset '{dataset}' is neither a known dataset ({', '.join(NAMES)}) nor an existing file; "
            "pass one of those names or the path of a .txt/.jsonl/.json file"
        )
    return dataset


# --- hub reachability and "auto" -------------------------------------------------------------------


def hub_reachable(timeout: float = HUB_CHECK_TIMEOUT_S) -> bool:
    """A quick TCP check of the Hugging Face endpoint; bounded in time even when DNS hangs."""
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return False
        endpoint = urlparse(constants.ENDPOINT)
    except ImportError:
        endpoint = urlparse("https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    result: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


def _auto_name(role: str) -> str:
    """pile-10k / wikitext2 when the hub can serve them, else the offline builtin set."""
    wanted = "pile-10k" if role == "calibration" else "wikitext2"
    if _datasets_module_or_none() is None:
        logger.info("%s data: 'datasets' is not installed, using 'builtin' instead of %s", role, wanted)
        return "builtin"
    if not hub_reachable():
        logger.info("%s data: the hub is not reachable, using 'builtin' instead of %s", role, wanted)
        return "builtin"
    return wanted


# --- hub datasets ------------------------------------------------------------------------------------

# name -> role -> load_dataset arguments and the text field; the protocols of docs/methods.md
_HUB_SOURCES: dict[str, dict[str, dict[str, Any]]] = {
    "pile-10k": {
        "calibration": {"path": "NeelNanda/pile-10k", "split": "train", "field": "text"},
    },
    "wikitext2": {
        "calibration": {"path": "Salesforce/wikitext", "name": "wikitext-2-raw-v1", "split": "train"},
        "eval": {"path": "Salesforce/wikitext", "name": "wikitext-2-raw-v1", "split": "test"},
    },
    "c4": {
        "calibration": {
            "path": "allenai/c4",
            "data_files": {"train": "en/c4-train.00000-of-01024.json.gz"},
            "split": "train",
        },
        "eval": {
            "path": "allenai/c4",
            "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
            "split": "validation",
        },
    },
    "ptb": {
        "calibration": {
            "path": "ptb_text_only",
            "name": "penn_treebank",
            "split": "train",
            "field": "sentence",
        },
        "eval": {
            "path": "ptb_text_only",
            "name": "penn_treebank",
            "split": "validation",
            "field": "sentence",
        },
    },
}


def _datasets_module_or_none() -> ModuleType | None:
    try:
        import datasets
    except ImportError:
        return None
    return datasets


def _import_datasets(name: str) -> ModuleType:
    module = _datasets_module_or_none()
    if module is None:
        raise LowbitError(f"dataset '{name}' needs the 'datasets' package, which is not installed; {_INSTALL_HINT}")
    return module


class _TextColumn(Sequence):
    """Lazy view of one text field, so a 356k-document C4 shard is not copied into Python strings."""

    def __init__(self, dataset: Any, field: str) -> None:
        self._dataset, self._field = dataset, field

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        return self._dataset[int(index)][self._field]


def _hub_documents(name: str, *, role: str) -> tuple[Sequence[str], dict]:
    """Load one split of a hub dataset; every failure becomes a LowbitError naming the fix."""
    sources = _HUB_SOURCES[name]
    if role not in sources:
        raise LowbitError(f"dataset '{name}' has no {role} split in lowbit; use it for calibration only")
    spec = dict(sources[role])
    field = spec.pop("field", "text")
    datasets = _import_datasets(name)
    if not hub_reachable():
        raise LowbitError(f"dataset '{name}' needs the Hugging Face hub, which is not reachable; {_INSTALL_HINT}")
    revision = _hub_revision(spec["path"])
    kwargs: dict[str, Any] = {"revision": revision} if revision else {}
    if name == "ptb" and int(datasets.__version__.split(".")[0]) < 4:
        kwargs["trust_remote_code"] = True  # ptb_text_only is a script dataset (datasets < 4 only)
    logger.info("loading %s %s split from the hub (%s)", name, spec["split"], spec["path"])
    try:
        dataset = datasets.load_dataset(**spec, **kwargs)
    except Exception as e:  # network, missing files, scripts unsupported: all mean "cannot get it"
        raise LowbitError(
            f"could not load dataset '{name}' from the hub ({type(e).__name__}: {first_line(e)}); "
            f"check the network or {_INSTALL_HINT}"
        ) from e
    documents: Sequence[str] = _TextColumn(dataset, field) if name == "c4" else list(dataset[field])
    meta = {
        "name": name,
        "source": spec["path"],
        "config": spec.get("name"),
        "data_files": spec.get("data_files"),
        "split": spec["split"],
        "revision": revision,
        "datasets_version": datasets.__version__,
        "role": role,
        "n_documents": len(documents),
    }
    return documents, meta


def _hub_revision(repo_id: str) -> str | None:
    """The commit the data is read at, so the run record can name it; None when the hub will not say."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(repo_id, timeout=10).sha
    except Exception as e:  # the load itself reports real failures; the revision is best effort
        logger.debug("could not resolve the revision of %s: %s", repo_id, e)
        return None
