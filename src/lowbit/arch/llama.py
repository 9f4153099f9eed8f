"""Llama-like family: Llama, Mistral, Qwen2 and SmolLM2 share one block layout; Qwen3 adds q_norm/k_norm."""

from dataclasses import replace

from lowbit.arch.base import ArchSpec, FFNNeurons, ScaleGroup

LLAMA_LIKE = ArchSpec(
    family="llama-like",
    model_types=("llama", "mistral", "qwen2"),
    blocks_path="model.layers",
    sequential=(
        ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"),
        ("self_attn.o_proj",),
        ("mlp.up_proj", "mlp.gate_proj"),
        ("mlp.down_proj",),
    ),
    scale_groups=(
        ScaleGroup(
            prev="input_layernorm",
            linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            prev_kind="norm",
            inspect="self_attn",
        ),
        ScaleGroup(
            prev="self_attn.v_proj",
            linears=("self_attn.o_proj",),
            prev_kind="linear",
            inspect="self_attn.o_proj",
            needs_same_shape=True,
            in_paper_teq=False,
        ),
        ScaleGroup(
            prev="post_attention_layernorm",
            linears=("mlp.gate_proj", "mlp.up_proj"),
            prev_kind="norm",
            inspect="mlp",
            key="mlp.up_proj",
        ),
        ScaleGroup(
            prev="mlp.up_proj",
            linears=("mlp.down_proj",),
            prev_kind="linear",
            inspect="mlp.down_proj",
            in_paper_teq=False,
        ),
    ),
    ffn=FFNNeurons(expand=("mlp.gate_proj", "mlp.up_proj"), contract="mlp.down_proj", activation="swiglu"),
    norms=("input_layernorm", "post_attention_layernorm"),
    query_key=("self_attn.q_proj", "self_attn.k_proj"),
    rotary=True,
)

# Qwen3 (dense): the Llama layout plus q_norm/k_norm after the projections, so q<->k scaling is no equivalence
QWEN3 = replace(LLAMA_LIKE, family="qwen3", model_types=("qwen3",), qk_norm=True)
