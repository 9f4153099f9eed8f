"""Per-family GGUF facts, read from llama.cpp's `convert_hf_to_gguf.py` (what it writes) and `llama-model.cpp` (what
the loader assumes when a key is absent): the architecture, whether Q/K rows are permuted, whether norm weights are
stored as 1 + w, the hyper-parameter keys, and why a model of the family cannot be written (checked before
calibration).

Only Llama (and Mistral, which the converter writes as Llama) uses llama.cpp's "normal" RoPE and needs the Q/K row
permutation; Qwen2/3, Gemma 2/3 and Phi-3 use NeoX RoPE, so their rows are written as transformers holds them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gguf

A = gguf.MODEL_ARCH


@dataclass(frozen=True)
class GgufFamily:
    """What the writer needs to know of one transformers `model_type`."""

    arch: gguf.MODEL_ARCH
    permute_qk: bool = False  # llama.cpp's LLAMA arch rotates interleaved pairs: the converter permutes Q/K rows
    norm_shift: float = 0.0  # Gemma scales by (1 + w); llama.cpp by w, so the converter stores w + 1
    extra_hparams: Callable[[gguf.GGUFWriter, Any], None] | None = None
    problem: Callable[[Any], str | None] | None = None
    rope_types: tuple[str, ...] = ("default",)  # of the global layers, as transformers names them


def _global_rope(config: Any) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or {}
    return params["full_attention"] if isinstance(params.get("full_attention"), dict) else params


def rope_of(config: Any) -> tuple[float, str]:
    """(theta, rope type) of the global attention layers, from transformers 5's `rope_parameters` (flat, or per layer
    type as Gemma 3 holds it) or the older `rope_theta` / `rope_scaling`."""
    params = _global_rope(config)
    scaling = getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), str(kind)


def head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _swa_layers(config: Any, pattern: int) -> str | None:
    """llama.cpp hard-codes which layers slide (layer i slides when i % pattern < pattern - 1); transformers reads
    `layer_types`. They must agree."""
    types = list(getattr(config, "layer_types", None) or [])
    expected = ["sliding_attention" if i % pattern < pattern - 1 else "full_attention" for i in range(len(types))]
    if types and types != expected:
        return (
            f"its layer_types are not llama.cpp's fixed pattern (every {pattern}th layer global), so llama.cpp "
            "would slide the wrong layers"
        )
    return None


def _gemma_scale(config: Any) -> str | None:
    """llama.cpp scales queries by 1/sqrt(head_dim) (n_embd/n_head for the 27B layer counts), not by the config's
    query_pre_attn_scalar: they must agree."""
    layers = int(config.num_hidden_layers)
    big = (config.model_type == "gemma2" and layers == 46) or (config.model_type == "gemma3_text" and layers == 62)
    used = config.hidden_size // config.num_attention_heads if big else head_dim(config)
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is not None and int(scalar) != used:
        return f"query_pre_attn_scalar {scalar} is not the {used} llama.cpp scales queries by"
    return None


def _gemma2_problem(config: Any) -> str | None:
    caps = (getattr(config, "attn_logit_softcapping", None), getattr(config, "final_logit_softcapping", None))
    if None in caps:
        return "a Gemma 2 model without soft-capping: llama.cpp always soft-caps Gemma 2 (50 / 30 when unset)"
    return _gemma_scale(config) or _swa_layers(config, 2)


def _gemma3_problem(config: Any) -> str | None:
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "attention soft-capping in a Gemma 3 model: llama.cpp's Gemma 3 has none"
    params = getattr(config, "rope_parameters", None) or {}
    local = params.get("sliding_attention") if isinstance(params.get("sliding_attention"), dict) else None
    if local is not None and (local.get("rope_type", "default") != "default" or float(local["rope_theta"]) != 10000.0):
        return f"sliding layers' RoPE {local}: llama.cpp's Gemma 3 uses default RoPE, theta 10000, on them"
    return _gemma_scale(config) or _swa_layers(config, 6)


def _qwen2_problem(config: Any) -> str | None:
    if getattr(config, "use_sliding_window", False):
        return "use_sliding_window is on: llama.cpp's Qwen2 has no sliding-window attention"
    return None


def _qwen3_moe_problem(config: Any) -> str | None:
    if not getattr(config, "norm_topk_prob", False):
        return "norm_topk_prob is off: llama.cpp's Qwen3-MoE always renormalizes the top-k routing weights"
    if list(getattr(config, "mlp_only_layers", None) or []) or int(getattr(config, "decoder_sparse_step", 1)) != 1:
        return "dense FFN layers (mlp_only_layers / decoder_sparse_step): llama.cpp puts experts in every layer"
    return _qwen2_problem(config)


def _mistral_problem(config: Any) -> str | None:
    window = getattr(config, "sliding_window", None)
    if window is not None and window < int(config.max_position_embeddings):
        return f"sliding_window {window}: llama.cpp runs Mistral as Llama, without a sliding window"
    return None


def _llama_problem(config: Any) -> str | None:
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "linear biases: llama.cpp's Llama reads none"
    return None


def _phi3_problem(config: Any) -> str | None:
    params = getattr(config, "rope_parameters", None) or {}
    if float(params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)) != 1.0:
        return "partial rotary embeddings: not checked against llama.cpp's Phi-3"
    window = getattr(config, "sliding_window", None)
    if window is not None and window < int(config.max_position_embeddings):
        return f"sliding_window {window}: llama.cpp runs Phi-3 without a sliding window"
    return None


def _gemma2_hparams(writer: gguf.GGUFWriter, config: Any) -> None:
    writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    writer.add_sliding_window(int(config.sliding_window))


def _gemma3_hparams(writer: gguf.GGUFWriter, config: Any) -> None:
    """Gemma 3 4B+ scales the global layers' positions linearly (factor 8); llama.cpp applies the file's scaling to
    the global layers only, as transformers does."""
    params = _global_rope(config)
    if params.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(int(config.sliding_window))
    if getattr(config, "final_logit_softcapping", None) is not None:
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


FAMILIES: dict[str, GgufFamily] = {
    "llama": GgufFamily(A.LLAMA, permute_qk=True, problem=_llama_problem),
    "mistral": GgufFamily(A.LLAMA, permute_qk=True, problem=lambda c: _llama_problem(c) or _mistral_problem(c)),
    "qwen2": GgufFamily(A.QWEN2, problem=_qwen2_problem),
    "qwen3": GgufFamily(A.QWEN3, problem=_qwen2_problem),
    "gemma2": GgufFamily(A.GEMMA2, norm_shift=1.0, extra_hparams=_gemma2_hparams, problem=_gemma2_problem),
    "gemma3_text": GgufFamily(
        A.GEMMA3,
        norm_shift=1.0,
        extra_hparams=_gemma3_hparams,
        problem=_gemma3_problem,
        rope_types=("default", "linear"),
    ),
    "phi3": GgufFamily(A.PHI3, problem=_phi3_problem),
    "qwen3_moe": GgufFamily(A.QWEN3MOE, problem=_qwen3_moe_problem),
}

# model types lowbit quantizes that llama.cpp runs but this writer does not write yet, with the reason
LATER: dict[str, str] = {}
