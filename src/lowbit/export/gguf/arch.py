"""What llama.cpp needs of a model family: its GGUF architecture, hyper-parameter keys, tensor names and the row
permutation its converter applies to attention Q/K (llama.cpp's `convert_hf_to_gguf.py`, `LlamaModel`).

Only families llama.cpp runs and lowbit has checked end to end are listed; any other family is refused before
calibration with the reason (`family_problem`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
from torch import nn

from lowbit.errors import LowbitError

# transformers model_type -> gguf-py architecture (llama.cpp's `general.architecture`)
SUPPORTED = {"llama": gguf.MODEL_ARCH.LLAMA}
_LATER = {
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3",
    "phi3": "Phi-3",
    "qwen3_moe": "Qwen3-MoE",
}


@dataclass(frozen=True)
class GgufArch:
    """One model's architecture facts for the writer: gguf arch, name map, the heads the Q/K permutation uses."""

    arch: gguf.MODEL_ARCH
    names: gguf.TensorNameMap
    n_head: int
    n_head_kv: int

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]

    def tensor_name(self, hf_name: str) -> str:
        """`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`; an unknown tensor is an error."""
        name = self.names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LowbitError(
                f"tensor {hf_name} has no GGUF name for architecture {self.arch_name}: this model holds a tensor "
                "llama.cpp's loader does not know; use --format compressed-tensors"
            )
        return name

    def permute_rows(self, gguf_name: str, rows: np.ndarray) -> np.ndarray:
        """llama.cpp's Q/K row order (rotary halves interleaved per head) for attn_q/attn_k; other tensors as they
        are. Rows of packed blocks are independent, so the packed bytes are permuted, never the codes."""
        heads = {"attn_q": self.n_head, "attn_k": self.n_head_kv}.get(gguf_name.split(".")[-2])
        if heads is None or rows.ndim != 2:
            return rows
        m = rows.shape[0]
        return rows.reshape(heads, 2, m // heads // 2, -1).swapaxes(1, 2).reshape(rows.shape)

    def unpermute_rows(self, gguf_name: str, rows: np.ndarray) -> np.ndarray:
        """Inverse of `permute_rows` (for verification: the file's attn_q/attn_k rows back in HF order)."""
        heads = {"attn_q": self.n_head, "attn_k": self.n_head_kv}.get(gguf_name.split(".")[-2])
        if heads is None or rows.ndim != 2:
            return rows
        m = rows.shape[0]
        return rows.reshape(heads, m // heads // 2, 2, -1).swapaxes(1, 2).reshape(rows.shape)


def _rope(config: Any) -> tuple[float, str]:
    """(theta, rope type) from transformers 5's `rope_parameters` or the older `rope_theta` / `rope_scaling`."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), str(kind)


def family_support(model_types: tuple[str, ...]) -> str:
    """The support-matrix cell of a family for `lowbit archs`: which of its model types GGUF export writes."""
    written = [t for t in model_types if t in SUPPORTED]
    if written == list(model_types):
        return "yes"
    if written:
        return f"{', '.join(written)} only"
    return "not yet" if any(t in _LATER for t in model_types) else "no (no llama.cpp architecture)"


def family_problem(model: nn.Module) -> str | None:
    """Why this model cannot be written as GGUF by lowbit, or None."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        later = f" ({_LATER[model_type]} is planned)" if model_type in _LATER else ""
        return (
            f"GGUF export supports the {', '.join(SUPPORTED)} family, not model_type {model_type!r}{later}; "
            "use --format compressed-tensors"
        )
    _, rope_type = _rope(config)
    if rope_type != "default":
        return f"GGUF export writes default RoPE only, this model uses {rope_type!r}: use --format compressed-tensors"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "GGUF export of Llama models with linear biases is not supported yet: use --format compressed-tensors"
    return None


def gguf_arch(model: nn.Module) -> GgufArch:
    """The architecture facts of a supported model (LowbitError naming the reason otherwise)."""
    problem = family_problem(model)
    if problem:
        raise LowbitError(problem)
    config = model.config
    arch = SUPPORTED[config.model_type]
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return GgufArch(arch, names, config.num_attention_heads, n_kv)


def add_hparams(writer: gguf.GGUFWriter, model: nn.Module) -> None:
    """The `llama.*` keys llama.cpp and transformers read (as the converter's `set_gguf_parameters` writes them)."""
    config = model.config
    theta, _ = _rope(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_rope_dimension_count(int(head_dim))
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
