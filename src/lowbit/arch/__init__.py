"""Architecture registry: one declarative ArchSpec per supported model family."""

from __future__ import annotations

from typing import Any

from lowbit.arch.base import ArchSpec, FFNNeurons, FusedLinear, ScaleGroup
from lowbit.arch.gemma import GEMMA2, GEMMA3
from lowbit.arch.llama import LLAMA_LIKE, QWEN3
from lowbit.arch.moe import ExpertParam, ExpertsSpec
from lowbit.arch.opt import OPT
from lowbit.arch.phi3 import PHI3
from lowbit.arch.qwen3_moe import QWEN3_MOE
from lowbit.errors import LowbitError

ARCH_SPECS: tuple[ArchSpec, ...] = (LLAMA_LIKE, OPT, QWEN3, GEMMA2, GEMMA3, PHI3, QWEN3_MOE)

__all__ = [
    "ARCH_SPECS",
    "ArchSpec",
    "ExpertParam",
    "ExpertsSpec",
    "FFNNeurons",
    "FusedLinear",
    "ScaleGroup",
    "arch_for",
    "window_bos_id",
]


def arch_for(model_or_config: Any) -> ArchSpec:
    """The ArchSpec for a model or config, or a clear error naming the supported families."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for spec in ARCH_SPECS:
        if model_type in spec.model_types:
            return spec
    if model_type == "gemma3":
        raise LowbitError(
            "'gemma3' is the multimodal Gemma 3; lowbit quantizes its text model: load it as Gemma3ForCausalLM "
            "(model_type gemma3_text, e.g. google/gemma-3-1b-it) or open an issue for the vision-language model"
        )
    supported = "; ".join(f"{spec.family} ({', '.join(spec.model_types)})" for spec in ARCH_SPECS)
    raise LowbitError(
        f"unsupported architecture '{model_type}'. Supported families: {supported}. "
        "To add one, write a small ArchSpec in lowbit/arch/ and list it in ARCH_SPECS."
    )


def window_bos_id(model_or_config: Any) -> int | None:
    """The BOS id every calibration/perplexity window must start with, or None (unknown family, a family that
    does not need it, or no BOS in the config): Gemma is far out of distribution without it."""
    config = getattr(model_or_config, "config", model_or_config)
    try:
        arch = arch_for(config)
    except LowbitError:
        return None
    bos = getattr(config, "bos_token_id", None)
    return int(bos) if arch.window_bos and isinstance(bos, int) else None
