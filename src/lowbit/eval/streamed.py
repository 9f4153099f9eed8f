"""Perplexity of a model that is never whole in memory: the evaluation windows ride along the streamed block loop.

Each window's hidden states pass through every block twice: through the float block as it is read ("before") and
through the final quantized block ("after"), each time with the kwargs the model's own forward gives that block,
one window at a time as `perplexity()` runs them; the model's head then gives each window's NLL. So a streamed
`--eval` reports the numbers a resident `--eval` reports, without a second read of the model (the GPTQ reference
evaluates layer by layer the same way). The chains are saved beside the calibration chains after every block, so
a resumed run continues them. A GGUF scheme rounds the token embedding and output in place before the loop starts
(export/gguf/embeddings.py): "before" runs on copies of their float weights, swapped in where it reads them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.arch import ArchSpec
from lowbit.engine.capture import capture_block_inputs
from lowbit.engine.context import call_block, move_to
from lowbit.engine.head import final_head
from lowbit.engine.streaming import BlockSource
from lowbit.errors import LowbitError
from lowbit.eval.perplexity import PerplexityResult, Windows, summarize, window_nll

log = logging.getLogger(__name__)

BEFORE, AFTER = "eval_fp", "eval_q"  # chain name prefixes, as saved beside the calibration chains


@dataclass(frozen=True)
class EvalText:
    """One evaluation text: its name in the run record, its windows and the data's own description."""

    name: str
    windows: Windows
    meta: dict[str, Any]


@contextlib.contextmanager
def swapped_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Run with these modules' weights replaced (module name -> weight), then put the model's back."""
    saved = {name: model.get_submodule(name).weight.data for name in weights}
    try:
        for name, weight in weights.items():
            model.get_submodule(name).weight.data = weight
        yield
    finally:
        for name, weight in saved.items():
            model.get_submodule(name).weight.data = weight


def in_memory(chain: Any) -> torch.Tensor:
    """A restored chain as a tensor in RAM (with engine.offload=disk the loop's store reads it into a file)."""
    return chain if isinstance(chain, torch.Tensor) else chain[0 : chain.shape[0]]


class StreamedEvaluation:
    """The before/after perplexity chains of a streamed run, advanced by the block loop (`engine.streaming.
    BlockObserver`): `float_block` with each block as read, `final_block` with its final weights."""

    def __init__(
        self,
        model: nn.Module,
        arch: ArchSpec,
        texts: list[EvalText],
        *,
        device: torch.device,
        source: BlockSource,
        float_weights: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """`float_weights`: float copies of the weights the run rounds outside the blocks (module name -> weight)."""
        self.model, self.arch, self.texts, self.device, self.source = model, arch, texts, device, source
        self.float_weights = float_weights or {}
        self.kwargs: dict[str, list[dict[str, Any]]] = {}
        self.hidden: dict[str, torch.Tensor] = {}

    def begin(self) -> None:
        """Block 0's input and every block's kwargs for each text's windows (the blocks stay unread)."""
        for text in self.texts:
            with swapped_weights(self.model, self.float_weights):
                captured = self._capture(text)
            self.kwargs[text.name] = captured.per_block
            self.hidden[f"{BEFORE}:{text.name}"] = captured.hidden  # the same input unless the embedding was rounded
            self.hidden[f"{AFTER}:{text.name}"] = self._capture(text).hidden if self.float_weights else captured.hidden

    def _capture(self, text: EvalText) -> Any:
        return capture_block_inputs(self.model, self.arch, text.windows.ids, batch_size=1, device=self.device,
                                    source=self.source)  # fmt: skip

    def chain_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in self.hidden.values()}.values())

    def chains(self) -> dict[str, torch.Tensor]:
        """What a resumed run needs: every chain as the last finished block left it."""
        return dict(self.hidden)

    def restore(self, chains: dict[str, torch.Tensor]) -> None:
        """Continue from the chains a finished block saved; a run started without --eval has none."""
        missing = sorted(set(self.hidden) - set(chains))
        if missing:
            raise LowbitError(
                "the interrupted run was started with other --eval settings, so its evaluation chains are missing: "
                "resume with the same --eval options, or start over without --resume"
            )
        self.hidden = {name: in_memory(chains[name]) for name in self.hidden}

    @torch.no_grad()
    def float_block(self, index: int, block: nn.Module) -> None:
        self._advance(BEFORE, index, block)

    @torch.no_grad()
    def final_block(self, index: int, block: nn.Module) -> None:
        self._advance(AFTER, index, block)

    def _advance(self, prefix: str, index: int, block: nn.Module) -> None:
        for text in self.texts:
            name = f"{prefix}:{text.name}"
            hidden = self.hidden[name]
            kwargs = {key: move_to(value, self.device) for key, value in self.kwargs[text.name][index].items()}
            out = torch.empty_like(hidden)
            for row in range(hidden.shape[0]):  # one window at a time, as perplexity() runs the whole model
                out[row : row + 1] = call_block(block, hidden[row : row + 1].to(self.device), kwargs).to("cpu")
            self.hidden[name] = out

    @torch.no_grad()
    def results(self) -> dict[str, dict[str, dict]]:
        """{"before": {text: result}, "after": {...}} as a resident run's `record["evaluation"]` holds them."""
        head = final_head(self.model, self.arch)
        report: dict[str, dict[str, dict]] = {"before": {}, "after": {}}
        for key, prefix in (("before", BEFORE), ("after", AFTER)):
            with swapped_weights(self.model, self.float_weights if key == "before" else {}):
                for text in self.texts:
                    result = self._perplexity(head, self.hidden[f"{prefix}:{text.name}"], text.windows)
                    report[key][text.name] = {**result.to_dict(), "data": text.meta}
        return report

    def _perplexity(self, head: nn.Module, hidden: torch.Tensor, windows: Windows) -> PerplexityResult:
        nlls = []
        for row in range(hidden.shape[0]):
            logits = head(hidden[row : row + 1].to(self.device))
            nlls.append(window_nll(logits, windows.ids[row : row + 1].to(self.device), row))
        return summarize(nlls, windows)
