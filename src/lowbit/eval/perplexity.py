"""Perplexity exactly as the GPTQ/OmniQuant reference code computes it (docs/methods.md)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.arch import window_bos_id
from lowbit.distributed.group import Group
from lowbit.errors import LowbitError


@dataclass(frozen=True)
class PerplexityResult:
    """PPL = exp(mean over windows of each window's mean next-token NLL)."""

    ppl: float
    mean_nll: float
    windows: int
    seqlen: int
    tokens_available: int
    bos_first: bool = False  # each window was BOS + (seqlen - 1) stream tokens (families that need BOS: Gemma)

    def to_dict(self) -> dict:
        return asdict(self)


def window_count(n_tokens: int, seqlen: int, max_windows: int | None) -> int:
    """floor(N / L) non-overlapping windows, optionally capped to the first `max_windows`."""
    count = n_tokens // seqlen
    return count if max_windows is None else min(count, max_windows)


@dataclass(frozen=True)
class Windows:
    """The evaluation windows of a token stream: `ids` [count, seqlen], each BOS-first where the family needs it."""

    ids: torch.Tensor
    tokens_available: int
    bos_first: bool


def cut_windows(
    model: nn.Module, input_ids: torch.Tensor, *, seqlen: int, max_windows: int | None, bos: bool | None
) -> Windows:
    """Non-overlapping windows of `seqlen` tokens. For a family that needs a leading BOS (`bos=None` asks the
    model's ArchSpec, True/False force it), each window is the model's BOS + the next seqlen - 1 stream tokens (a
    leading BOS of the stream is dropped), still L - 1 predictions per window."""
    if seqlen < 2:
        raise LowbitError(f"perplexity window length must be at least 2, got {seqlen}")
    bos_id = window_bos_id(model) if bos is None else (model.config.bos_token_id if bos else None)
    stream = input_ids.reshape(-1)
    if bos_id is not None:
        stream = stream[1:] if stream.numel() and int(stream[0]) == bos_id else stream
        step = seqlen - 1
    else:
        step = seqlen
    count = window_count(stream.numel(), step, max_windows)
    if count < 1:
        raise LowbitError(
            f"evaluation text has {stream.numel()} tokens, fewer than one window of {seqlen}; "
            "use a longer dataset or a smaller --eval-seqlen"
        )
    ids = stream[: count * step].reshape(count, step)
    if bos_id is not None:
        ids = torch.cat([ids.new_full((count, 1), bos_id), ids], dim=1)
    return Windows(ids, stream.numel(), bos_id is not None)


def window_nll(logits: torch.Tensor, window: torch.Tensor, index: int) -> float:
    """Mean next-token NLL of one window [1, L] given its logits [1, L, vocab]; NaN/Inf is a clear error."""
    nll = F.cross_entropy(logits[0, :-1].float(), window[0, 1:], reduction="mean").item()
    if not math.isfinite(nll):
        raise LowbitError(
            f"the model's outputs contain NaN/Inf (window {index}); the checkpoint is broken or overflowed in "
            "half precision: evaluate in float32"
        )
    return nll


def summarize(nlls: list[float], windows: Windows) -> PerplexityResult:
    mean_nll = sum(nlls) / len(nlls)
    seqlen = windows.ids.shape[1]
    return PerplexityResult(math.exp(mean_nll), mean_nll, len(nlls), seqlen, windows.tokens_available,
                            windows.bos_first)  # fmt: skip


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    seqlen: int = 2048,
    max_windows: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    bos: bool | None = None,
    group: Group | None = None,
) -> PerplexityResult:
    """Cut the token stream into non-overlapping windows (`cut_windows`), no KV cache, mean CE of the L-1
    predictions each. With a `group` of several ranks each evaluates its contiguous slice of the windows and every
    rank gets all the NLLs in window order: the same result, bit for bit, as one process."""
    group = Group() if group is None else group
    windows = cut_windows(model, input_ids, seqlen=seqlen, max_windows=max_windows, bos=bos)
    mine = range(windows.ids.shape[0])[group.shard(windows.ids.shape[0])]
    nlls = []
    for index in tqdm(mine, desc="perplexity", unit="window", disable=not progress or not group.is_main):
        window = windows.ids[index : index + 1].to(device)
        logits = model(input_ids=window, use_cache=False).logits
        nlls.append(window_nll(logits, window, index))
    nlls = [nll for part in group.gather_objects(nlls) for nll in part]
    return summarize(nlls, windows)
