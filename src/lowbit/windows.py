"""Token windows: tokenizing a text stream and the sampling protocols (stream windows, SignRound's documents,
GPTQ's random windows), each returning the rows and a meta dict that says how they were drawn."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lowbit.errors import LowbitError

EVAL_SEQLEN = 2048  # the window length of the reference perplexity protocol (docs/methods.md)
C4_EVAL_WINDOWS = 256
C4_EVAL_SEED = 0


def tokenize_stream(tokenizer: Any, text: str) -> torch.LongTensor:
    """Tokenize `text` in one call with the tokenizer's defaults, as [1, N].

    verbose=False silences the "sequence longer than the model maximum" warning: the stream is cut into
    windows later, so its length is expected.
    """
    ids = tokenizer(text, verbose=False)["input_ids"]
    return torch.tensor([ids], dtype=torch.long)


def sample_stream_windows(
    stream: torch.Tensor, *, nsamples: int, seqlen: int, seed: int, name: str
) -> tuple[torch.LongTensor, dict]:
    """Cut [1, N] into floor(N/seqlen) disjoint windows, shuffle their order with `seed`, take nsamples."""
    n_tokens = int(stream.shape[-1])
    n_windows = n_tokens // seqlen
    if n_windows < nsamples:
        raise _not_enough(name, f"has {n_tokens} tokens", nsamples, seqlen)
    order = list(range(n_windows))
    random.Random(seed).shuffle(order)
    chosen = order[:nsamples]
    windows = stream.reshape(-1)[: n_windows * seqlen].reshape(n_windows, seqlen)
    ids = windows[torch.tensor(chosen, dtype=torch.long)].clone()
    sampling = {
        "mode": "stream",
        "assembly": 'documents joined with "\\n\\n", tokenized once, cut into disjoint windows',
        "n_tokens": n_tokens,
        "n_windows": n_windows,
        "windows": chosen,
    }
    return ids, sampling


def sample_documents(
    tokenizer: Any, documents: Sequence[str], *, nsamples: int, seqlen: int, seed: int, name: str
) -> tuple[torch.LongTensor, dict]:
    """SignRound's protocol: shuffle documents, keep those with >= seqlen tokens, first seqlen of each.

    The order is numpy's default_rng(seed).permutation, which is what `datasets.Dataset.shuffle(seed=...)`
    uses, so the selection matches the reference implementation's.
    """
    order = np.random.default_rng(seed).permutation(len(documents))
    rows: list[list[int]] = []
    chosen: list[int] = []
    for index in order:
        ids = tokenizer(documents[int(index)], truncation=True, max_length=seqlen)["input_ids"]
        if len(ids) >= seqlen:
            rows.append(ids[:seqlen])
            chosen.append(int(index))
            if len(rows) == nsamples:
                break
    if len(rows) < nsamples:
        raise _not_enough(name, f"has only {len(rows)} documents of >= {seqlen} tokens", nsamples, seqlen)
    sampling = {
        "mode": "documents",
        "assembly": "documents shuffled with numpy default_rng(seed); first seqlen tokens of each document "
        "with >= seqlen tokens",
        "documents": chosen,
    }
    return torch.tensor(rows, dtype=torch.long), sampling


def sample_random_windows(
    tokenizer: Any, documents: Sequence[str], *, nsamples: int, seqlen: int, seed: int, name: str
) -> tuple[torch.LongTensor, dict]:
    """GPTQ's C4 protocol: a random document with more than seqlen tokens, then a random window of it."""
    rng = random.Random(seed)
    rows = _random_windows(tokenizer, documents, rng, count=nsamples, seqlen=seqlen, name=name)
    sampling = {
        "mode": "random-windows",
        "assembly": "Python random(seed) draws documents until one has more than seqlen tokens, "
        "then a random window of it (GPTQ protocol)",
    }
    return rows, sampling


def c4_eval_windows(tokenizer: Any, documents: Sequence[str]) -> torch.LongTensor:
    """The GPTQ C4 perplexity stream: 256 random windows of 2048 tokens, seed 0, concatenated to [1, N]."""
    rng = random.Random(C4_EVAL_SEED)
    rows = _random_windows(tokenizer, documents, rng, count=C4_EVAL_WINDOWS, seqlen=EVAL_SEQLEN, name="c4")
    return rows.reshape(1, -1)


def _random_windows(
    tokenizer: Any, documents: Sequence[str], rng: random.Random, *, count: int, seqlen: int, name: str
) -> torch.LongTensor:
    """The reference loop, with a bound on draws so a dataset of short documents errors instead of hanging.

    The reference breaks on `> seqlen` for calibration; where it tests `>=`, a document of exactly seqlen
    tokens makes it crash (randint(0, -1)), so every successful reference run draws the same windows.
    """
    max_draws = 100 * count + len(documents)
    rows: list[list[int]] = []
    draws = 0
    while len(rows) < count:
        while True:
            draws += 1
            if draws > max_draws:
                raise _not_enough(
                    name,
                    f"gave {len(rows)} documents of > {seqlen} tokens in {max_draws} draws",
                    count,
                    seqlen,
                )
            ids = tokenizer(documents[rng.randint(0, len(documents) - 1)], verbose=False)["input_ids"]
            if len(ids) > seqlen:
                break
        start = rng.randint(0, len(ids) - seqlen - 1)
        rows.append(ids[start : start + seqlen])
    return torch.tensor(rows, dtype=torch.long)


def _not_enough(name: str, what: str, nsamples: int, seqlen: int) -> LowbitError:
    return LowbitError(
        f"calibration data '{name}' {what}, fewer than nsamples x seqlen = {nsamples} x {seqlen} = "
        f"{nsamples * seqlen}; lower --nsamples/--seqlen or use a larger dataset"
    )


def with_leading_bos(rows: torch.Tensor, bos_id: int) -> torch.LongTensor:
    """Rows [n, L] that each start with `bos_id`: rows already starting with it are kept, the others become
    [bos, row[:-1]] (same length)."""
    shifted = torch.cat([torch.full_like(rows[:, :1], bos_id), rows[:, :-1]], dim=1)
    keep = (rows[:, :1] == bos_id).expand_as(rows)
    return torch.where(keep, rows, shifted)


def ids_sha256(ids: torch.Tensor) -> str:
    """SHA-256 of the ids as little-endian int64, row-major: the same tokens give the same hash anywhere."""
    array = ids.detach().cpu().to(torch.int64).contiguous().numpy().astype("<i8", copy=False)
    return hashlib.sha256(array.tobytes()).hexdigest()
