"""What llama.cpp needs of a model: its GGUF architecture, hyper-parameter keys, tensor names, the row permutation
its converter applies to Llama's attention Q/K, and Gemma's norms stored as 1 + w (per family: families.py).

Only families llama.cpp runs and lowbit has checked end to end are written; any other model is refused before
calibration with the reason (`family_problem`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import gguf
import numpy as np
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.export.gguf.families import FAMILIES, LATER, GgufFamily, head_dim, rope_of

# one expert's linear of a sparse block, as lowbit's per-expert linears name it (arch/moe.py)
_EXPERT = re.compile(r"(?P<prefix>.+\.experts)\.(?P<index>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight")


def expert_index(hf_name: str) -> int | None:
    """The expert of a per-expert linear's weight (`...experts.3.up_proj.weight` -> 3), None for other tensors."""
    match = _EXPERT.fullmatch(hf_name)
    return None if match is None else int(match["index"])


_NAMES = {
    "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma2": "Gemma 2", "gemma3_text": "Gemma 3",
    "phi3": "Phi-3", "llama": "Llama", "qwen3_moe": "Qwen3-MoE",
}  # fmt: skip


@dataclass(frozen=True)
class GgufArch:
    """One model's architecture facts for the writer: gguf arch, name map, the heads the Q/K permutation uses."""

    arch: gguf.MODEL_ARCH
    names: gguf.TensorNameMap
    n_head: int
    n_head_kv: int
    family: GgufFamily = FAMILIES["llama"]

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]

    def tensor_name(self, hf_name: str) -> str:
        """`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`; an unknown tensor is an error. One
        expert's linear (`mlp.experts.3.down_proj.weight`) names the stacked tensor of its kind (`ffn_down_exps`)."""
        expert = _EXPERT.fullmatch(hf_name)
        if expert is not None:
            merged = self.names.get_name(f"{expert['prefix']}.{expert['proj']}")
            if merged is not None:
                return f"{merged}.weight"
        name = self.names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LowbitError(
                f"tensor {hf_name} has no GGUF name for architecture {self.arch_name}: this model holds a tensor "
                "llama.cpp's loader does not know; use --format compressed-tensors"
            )
        return name

    def stored_float(self, hf_name: str, tensor: Tensor) -> Tensor:
        """A float tensor as the file stores it: Gemma's norm weights as 1 + w in float32 (transformers computes
        `1.0 + w.float()`, llama.cpp multiplies by the stored value: the same float32 numbers)."""
        if self.family.norm_shift and hf_name.endswith("norm.weight"):
            return tensor.float() + self.family.norm_shift
        return tensor

    def _heads(self, gguf_name: str, rows: np.ndarray) -> int | None:
        if not self.family.permute_qk or rows.ndim != 2:
            return None
        return {"attn_q": self.n_head, "attn_k": self.n_head_kv}.get(gguf_name.split(".")[-2])

    def permute_rows(self, gguf_name: str, rows: np.ndarray) -> np.ndarray:
        """llama.cpp's Q/K row order (rotary halves interleaved per head) for attn_q/attn_k; other tensors as they
        are. Rows of packed blocks are independent, so the packed bytes are permuted, never the codes."""
        heads = self._heads(gguf_name, rows)
        if heads is None:
            return rows
        m = rows.shape[0]
        return rows.reshape(heads, 2, m // heads // 2, -1).swapaxes(1, 2).reshape(rows.shape)

    def unpermute_rows(self, gguf_name: str, rows: np.ndarray) -> np.ndarray:
        """Inverse of `permute_rows` (for verification: the file's attn_q/attn_k rows back in HF order)."""
        heads = self._heads(gguf_name, rows)
        if heads is None:
            return rows
        m = rows.shape[0]
        return rows.reshape(heads, m // heads // 2, 2, -1).swapaxes(1, 2).reshape(rows.shape)


def family_support(model_types: tuple[str, ...]) -> str:
    """The support-matrix cell of a family for `lowbit archs`: which of its model types GGUF export writes."""
    written = [t for t in model_types if t in FAMILIES]
    if written == list(model_types):
        return "yes"
    if written:
        return f"{', '.join(written)} only"
    return "not yet" if any(t in LATER for t in model_types) else "no (no llama.cpp architecture)"


def family_problem(model: nn.Module) -> str | None:
    """Why this model cannot be written as GGUF by lowbit, or None."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in LATER:
        reason = LATER[model_type]
        return f"GGUF export cannot write model_type {model_type!r} yet: {reason}; use --format compressed-tensors"
    if model_type not in FAMILIES:
        return (
            f"GGUF export supports model types {', '.join(FAMILIES)}, not model_type {model_type!r}; "
            "use --format compressed-tensors"
        )
    _, rope_type = rope_of(config)
    name = _NAMES.get(model_type, model_type)
    if rope_type not in FAMILIES[model_type].rope_types:
        return (
            f"GGUF export writes {' or '.join(FAMILIES[model_type].rope_types)} RoPE for {name}, this model uses "
            f"{rope_type!r}: use --format compressed-tensors"
        )
    problem = FAMILIES[model_type].problem
    reason = problem(config) if problem is not None else None
    if reason:
        return f"GGUF export of this {name} model is not supported: {reason}; use --format compressed-tensors"
    return None


def gguf_arch(model: nn.Module) -> GgufArch:
    """The architecture facts of a supported model (LowbitError naming the reason otherwise)."""
    problem = family_problem(model)
    if problem:
        raise LowbitError(problem)
    config = model.config
    family = FAMILIES[config.model_type]
    names = gguf.get_tensor_name_map(family.arch, config.num_hidden_layers)
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return GgufArch(family.arch, names, config.num_attention_heads, n_kv, family)


def add_hparams(writer: gguf.GGUFWriter, model: nn.Module) -> None:
    """The `<arch>.*` keys llama.cpp and transformers read (as the converter's `set_gguf_parameters` writes them)."""
    config = model.config
    family = FAMILIES[config.model_type]
    theta, _ = rope_of(config)
    dim = head_dim(config)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    if getattr(config, "num_experts", None):
        writer.add_expert_count(int(config.num_experts))
        writer.add_expert_used_count(int(config.num_experts_per_tok))
        writer.add_expert_feed_forward_length(int(config.moe_intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_rope_dimension_count(dim)
    if dim * config.num_attention_heads != config.hidden_size or family.arch != gguf.MODEL_ARCH.LLAMA:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    if family.extra_hparams is not None:
        family.extra_hparams(writer, config)
