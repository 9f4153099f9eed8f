"""Perplexity inside a run: the settings, the evaluation before and after a resident run, the streamed one, and the
window count the memory planner needs before the model loads (run.py calls these; `lowbit eval` too)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowbit.arch import arch_for
from lowbit.config import QuantizeConfig
from lowbit.data import eval_label, load_eval
from lowbit.distributed.group import Group
from lowbit.engine.streaming import BlockSource
from lowbit.errors import LowbitError
from lowbit.eval import perplexity
from lowbit.eval.perplexity import cut_windows, window_count
from lowbit.eval.streamed import EvalText, StreamedEvaluation
from lowbit.models import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSettings:
    """Perplexity of the float model before and of the result after (comma-separated dataset names)."""

    datasets: str = "auto"
    seqlen: int = 2048
    windows: int | None = None
    progress: bool = True

    def names(self) -> list[str]:
        """The dataset names, in the order given."""
        return [part.strip() for part in self.datasets.split(",") if part.strip()]


def evaluate_perplexity(
    model: torch.nn.Module, tokenizer: Any, settings: EvalSettings, group: Group | None = None
) -> dict[str, dict]:
    """Perplexity on each of `settings.datasets`, keyed by the dataset's own name (windows split over `group`)."""
    results = {}
    for name in settings.names():
        data = load_eval(tokenizer, name)
        result = perplexity(model, data.input_ids, seqlen=settings.seqlen, max_windows=settings.windows,
                            progress=settings.progress, group=group)  # fmt: skip
        results[eval_label(name, data.meta)] = {**result.to_dict(), "data": data.meta}
    return results


def streamed_evaluation(
    loaded: LoadedModel, config: QuantizeConfig, settings: EvalSettings, source: BlockSource
) -> StreamedEvaluation:
    """The evaluation of a streamed run: each of `settings.datasets` cut into windows as `perplexity()` cuts them."""
    texts = []
    for name in settings.names():
        data = load_eval(loaded.tokenizer, name)
        windows = cut_windows(loaded.model, data.input_ids, seqlen=settings.seqlen, max_windows=settings.windows,
                              bos=None)  # fmt: skip
        texts.append(EvalText(eval_label(name, data.meta), windows, data.meta))
    float_weights = {}  # a GGUF scheme rounds the embedding/output before the loop: "before" keeps float copies
    if config.scheme.gguf is not None:
        from lowbit.export.gguf.embeddings import outside_types

        for name in outside_types(loaded.model, config.scheme):
            float_weights[name] = loaded.model.get_submodule(name).weight.detach().clone()
    return StreamedEvaluation(loaded.model, arch_for(loaded.model), texts, device=torch.device(config.engine.device),
                              source=source, float_weights=float_weights)  # fmt: skip


def count_eval_windows(path: Path, settings: EvalSettings, *, trust_remote_code: bool = False) -> int | None:
    """At most how many windows the evaluation cuts (every dataset together), from the tokenizer alone: the memory
    planner counts a streamed evaluation's chains by it. None where the text cannot be read yet."""
    from lowbit.models import load_tokenizer

    try:
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        counts = []
        for name in settings.names():
            tokens = load_eval(tokenizer, name).input_ids.numel()
            counts.append(window_count(tokens, settings.seqlen - 1, settings.windows))  # BOS-first windows: L - 1
    except LowbitError as error:
        log.info("evaluation windows not counted before loading (%s)", error)
        return None
    return sum(counts)
