"""A model's shape from its config.json alone: what the memory planner (planner/plan.py) sizes a run from.

Why: the planner must refuse a run that cannot fit before a single weight is read, so every size it needs (parameters
per block, per linear, outside the blocks) comes from the config, never from the model. The counts follow the
transformers modeling code of each supported family exactly (tests/test_plan.py checks them against
`AutoModelForCausalLM.from_config` on tiny configs); a missing config field takes the family's transformers default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "opt", "qwen3_moe")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "float8_e4m3fn": 1, "float8_e5m2": 1}
DEFAULT_DTYPE = "bfloat16"  # what a config.json without torch_dtype/dtype is assumed to hold (the hub's usual)


@dataclass(frozen=True)
class LinearShape:
    """One quantized linear of a block (`count` > 1: that many experts of the same shape)."""

    name: str
    out_features: int
    in_features: int
    bias: bool = False
    count: int = 1
    input: str = ""  # linears fed the same tensor (q/k/v) share one input: AWQ's features, GPTQ's X^T X product
    subset: int = 0  # GPTQ's true-sequential subset (arch.sequential order)

    @property
    def weights(self) -> int:
        """Weight elements over every copy (experts)."""
        return self.out_features * self.in_features * self.count

    @property
    def params(self) -> int:
        return self.weights + (self.out_features * self.count if self.bias else 0)


@dataclass(frozen=True)
class BlockShape:
    """One decoder block: its quantized linears and every other parameter (norms, a router)."""

    linears: tuple[LinearShape, ...]
    other_params: int

    @property
    def params(self) -> int:
        return sum(linear.params for linear in self.linears) + self.other_params

    @property
    def linear_weights(self) -> int:
        return sum(linear.weights for linear in self.linears)

    def subsets(self) -> list[list[LinearShape]]:
        """GPTQ's true-sequential subsets in order."""
        count = max((linear.subset for linear in self.linears), default=-1) + 1
        return [[linear for linear in self.linears if linear.subset == i] for i in range(count)]


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a causal LM read from its config: dimensions, per-block parameters, checkpoint dtype."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    blocks: tuple[BlockShape, ...]
    non_block_params: int
    dtype: str = DEFAULT_DTYPE
    num_experts: int = 0
    moe_intermediate_size: int = 0
    lm_head_params: int = 0  # 0 when tied

    @classmethod
    def from_config(cls, source: str | Path | dict[str, Any] | Any) -> ModelShape:
        """From a config.json (its path, its directory, its dict) or a transformers `PretrainedConfig`."""
        raw, config = _load(source)
        model_type = getattr(config, "model_type", None) or raw.get("model_type")
        builder = _BUILDERS.get(model_type)
        if builder is None:
            raise LowbitError(
                f"the memory planner does not know model type '{model_type}' (known: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        dtype = str(raw.get("dtype") or raw.get("torch_dtype") or _config_dtype(config) or DEFAULT_DTYPE)
        dtype = dtype.removeprefix("torch.")
        if dtype not in DTYPE_BYTES:
            dtype = DEFAULT_DTYPE
        return builder(config, model_type, dtype)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def block_params(self) -> list[int]:
        return [block.params for block in self.blocks]

    @property
    def largest_block(self) -> BlockShape:
        return max(self.blocks, key=lambda block: block.params)

    @property
    def params(self) -> int:
        """Every parameter, a tied lm_head once (as `sum(p.numel() for p in model.parameters())` counts them)."""
        return sum(self.block_params) + self.non_block_params

    @property
    def checkpoint_bytes(self) -> int:
        return self.params * self.dtype_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_layers": self.num_layers, "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim, "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings, "num_experts": self.num_experts,
            "moe_intermediate_size": self.moe_intermediate_size, "dtype": self.dtype, "params": self.params,
            "largest_block_params": self.largest_block.params, "non_block_params": self.non_block_params,
        }  # fmt: skip


def _load(source: Any) -> tuple[dict[str, Any], Any]:
    """(the raw config dict, a transformers config with the family's defaults filled in)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source.to_dict(), source
    if isinstance(source, str | Path):
        path = Path(source).expanduser()
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise LowbitError(f"no config.json at '{path}': pass a model directory or its config.json")
        try:
            raw = json.loads(file.read_text())
        except (OSError, ValueError) as e:
            raise LowbitError(f"'{file}' is not a readable JSON config ({type(e).__name__})") from None
    elif isinstance(source, dict):
        raw = dict(source)
    else:
        raise LowbitError(f"cannot read a model shape from a {type(source).__name__}: pass a config dict or path")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise LowbitError(
            f"the memory planner does not know model type '{model_type}' (known: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "transformers_version", "architectures")}
    return raw, AutoConfig.for_model(model_type, **fields)


def _config_dtype(config: Any) -> str | None:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return None if dtype is None else str(dtype)


def _attention(config: Any, heads: int, kv_heads: int, head_dim: int, bias: bool, o_bias: bool) -> list[LinearShape]:
    hidden = config.hidden_size
    return [
        LinearShape("self_attn.k_proj", kv_heads * head_dim, hidden, bias, input="attn_in", subset=0),
        LinearShape("self_attn.v_proj", kv_heads * head_dim, hidden, bias, input="attn_in", subset=0),
        LinearShape("self_attn.q_proj", heads * head_dim, hidden, bias, input="attn_in", subset=0),
        LinearShape("self_attn.o_proj", hidden, heads * head_dim, o_bias, input="attn_out", subset=1),
    ]


def _mlp(hidden: int, inter: int, bias: bool = False) -> list[LinearShape]:
    return [
        LinearShape("mlp.up_proj", inter, hidden, bias, input="mlp_in", subset=2),
        LinearShape("mlp.gate_proj", inter, hidden, bias, input="mlp_in", subset=2),
        LinearShape("mlp.down_proj", hidden, inter, bias, input="mlp_mid", subset=3),
    ]


def _dims(config: Any) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


def _llama_like(config: Any, model_type: str, dtype: str) -> ModelShape:
    """Llama, Mistral, Qwen2/3, Gemma2/3 and Qwen3-MoE: q/k/v/o + gated MLP (or sparse experts), RMS norms."""
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv_heads, head_dim = _dims(config)
    attention_bias = bool(getattr(config, "attention_bias", False))
    qkv_bias = True if model_type == "qwen2" else attention_bias
    o_bias = False if model_type == "qwen2" else attention_bias
    norms = hidden * (4 if model_type.startswith("gemma") else 2)
    if model_type in ("qwen3", "gemma3_text", "qwen3_moe"):
        norms += 2 * head_dim  # q_norm, k_norm
    attention = _attention(config, heads, kv_heads, head_dim, qkv_bias, o_bias)
    experts = int(getattr(config, "num_experts", 0) or 0) if model_type == "qwen3_moe" else 0
    moe_inter = int(getattr(config, "moe_intermediate_size", 0) or 0) if experts else 0
    blocks = []
    for index in range(layers):
        sparse = (
            experts > 0
            and index not in (getattr(config, "mlp_only_layers", None) or [])
            and ((index + 1) % max(int(getattr(config, "decoder_sparse_step", 1) or 1), 1) == 0)
        )
        if sparse:
            ffn = [
                LinearShape("mlp.experts.*.up_proj", moe_inter, hidden, count=experts, input="expert_in", subset=2),
                LinearShape("mlp.experts.*.gate_proj", moe_inter, hidden, count=experts, input="expert_in", subset=2),
                LinearShape("mlp.experts.*.down_proj", hidden, moe_inter, count=experts, input="expert_mid", subset=3),
            ]
            other = norms + experts * hidden  # + the float router mlp.gate [E, hidden]
        else:
            ffn, other = _mlp(hidden, inter, bool(getattr(config, "mlp_bias", False))), norms
        blocks.append(BlockShape(tuple(attention + ffn), other))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    lm_head = 0 if tied else config.vocab_size * hidden
    non_block = config.vocab_size * hidden + hidden + lm_head
    return ModelShape(
        model_type, hidden, inter, layers, heads, kv_heads, head_dim, config.vocab_size, tied, tuple(blocks),
        non_block, dtype, experts, moe_inter, lm_head,
    )  # fmt: skip


def _phi3(config: Any, model_type: str, dtype: str) -> ModelShape:
    """Phi-3: fused qkv_proj and gate_up_proj, no biases."""
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv_heads, head_dim = _dims(config)
    linears = (
        LinearShape("self_attn.qkv_proj", (heads + 2 * kv_heads) * head_dim, hidden, input="attn_in", subset=0),
        LinearShape("self_attn.o_proj", hidden, heads * head_dim, input="attn_out", subset=1),
        LinearShape("mlp.gate_up_proj", 2 * inter, hidden, input="mlp_in", subset=2),
        LinearShape("mlp.down_proj", hidden, inter, input="mlp_mid", subset=3),
    )
    tied = bool(getattr(config, "tie_word_embeddings", False))
    lm_head = 0 if tied else config.vocab_size * hidden
    blocks = tuple(BlockShape(linears, 2 * hidden) for _ in range(layers))
    non_block = config.vocab_size * hidden + hidden + lm_head
    return ModelShape(
        model_type, hidden, inter, layers, heads, kv_heads, head_dim, config.vocab_size, tied, blocks, non_block,
        dtype, lm_head_params=lm_head,
    )  # fmt: skip


def _opt(config: Any, model_type: str, dtype: str) -> ModelShape:
    """OPT: biased q/k/v/out_proj and fc1/fc2, LayerNorms, learned positions (offset 2), optional projections."""
    hidden, ffn, layers = config.hidden_size, config.ffn_dim, config.num_hidden_layers
    heads = config.num_attention_heads
    bias = bool(getattr(config, "enable_bias", True))
    affine = bool(getattr(config, "layer_norm_elementwise_affine", True))
    norm = 2 * hidden if affine else 0  # LayerNorm weight + bias
    linears = (
        LinearShape("self_attn.q_proj", hidden, hidden, bias, input="attn_in", subset=0),
        LinearShape("self_attn.k_proj", hidden, hidden, bias, input="attn_in", subset=0),
        LinearShape("self_attn.v_proj", hidden, hidden, bias, input="attn_in", subset=0),
        LinearShape("self_attn.out_proj", hidden, hidden, bias, input="attn_out", subset=1),
        LinearShape("fc1", ffn, hidden, bias, input="mlp_in", subset=2),
        LinearShape("fc2", hidden, ffn, bias, input="mlp_mid", subset=3),
    )
    blocks = tuple(BlockShape(linears, 2 * norm) for _ in range(layers))
    proj = int(getattr(config, "word_embed_proj_dim", None) or hidden)
    tied = bool(getattr(config, "tie_word_embeddings", True))
    lm_head = 0 if tied else config.vocab_size * proj
    non_block = config.vocab_size * proj + (config.max_position_embeddings + 2) * hidden + lm_head
    if getattr(config, "do_layer_norm_before", True) and not getattr(config, "_remove_final_layer_norm", False):
        non_block += norm
    if proj != hidden:
        non_block += 2 * proj * hidden  # project_in, project_out
    return ModelShape(
        model_type, hidden, ffn, layers, heads, heads, hidden // heads, config.vocab_size, tied, blocks, non_block,
        dtype, lm_head_params=lm_head,
    )  # fmt: skip


_BUILDERS = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "qwen3_moe"), _llama_like),
    "phi3": _phi3,
    "opt": _opt,
}
