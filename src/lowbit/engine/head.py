"""The model's head as a module of its own: what turns the last block's output into logits.

Whoever runs the blocks one at a time (InvarExplore's objective, the streamed evaluation) ends with it, and it must
compute exactly what the model's own forward does after its last block.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowbit.arch import ArchSpec


def final_head(model: nn.Module, arch: ArchSpec) -> nn.Module:
    """Everything between the last block's output and the logits: final norm (and OPT's project_out), lm_head."""
    if arch.family == "opt":
        decoder = model.get_submodule("model.decoder")
        parts = [m for m in (decoder.final_layer_norm, decoder.project_out) if m is not None]
    else:
        parts = [model.get_submodule(arch.final_norm)]
    parts.append(model.get_output_embeddings())
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma 2: logits = cap * tanh(logits / cap)
        parts.append(SoftCap(float(cap)))
    return nn.Sequential(*parts)


class SoftCap(nn.Module):
    """cap * tanh(x / cap), the logit soft-capping of Gemma 2, as the model's own head applies it."""

    def __init__(self, cap: float) -> None:
        super().__init__()
        self.cap = cap

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / self.cap) * self.cap
