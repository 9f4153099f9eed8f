"""Phi-3 / Phi-3.5: fused `qkv_proj` ([q; k; v] rows) and `gate_up_proj` ([gate; up] rows).

Each fused linear is quantized as one (serving engines load it as one layer); v->o and up->down scale the v and up
row slices. q<->k scaling over the fused rows is not declared (no q<->k pair for LET).
"""

from lowbit.arch.base import ArchSpec, FFNNeurons, FusedLinear, ScaleGroup

QKV = FusedLinear("self_attn.qkv_proj", (("q", "heads"), ("k", "kv_heads"), ("v", "kv_heads")))
GATE_UP = FusedLinear("mlp.gate_up_proj", (("gate", "intermediate"), ("up", "intermediate")))

PHI3 = ArchSpec(
    family="phi3",
    model_types=("phi3",),
    blocks_path="model.layers",
    sequential=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    scale_groups=(
        ScaleGroup(prev="input_layernorm", linears=("self_attn.qkv_proj",), prev_kind="norm", inspect="self_attn"),
        ScaleGroup(
            prev="self_attn.qkv_proj",
            linears=("self_attn.o_proj",),
            prev_kind="linear",
            inspect="self_attn.o_proj",
            needs_same_shape=True,
            in_paper_teq=False,
            prev_part="v",
        ),
        ScaleGroup(prev="post_attention_layernorm", linears=("mlp.gate_up_proj",), prev_kind="norm", inspect="mlp"),
        ScaleGroup(
            prev="mlp.gate_up_proj",
            linears=("mlp.down_proj",),
            prev_kind="linear",
            inspect="mlp.down_proj",
            in_paper_teq=False,
            prev_part="up",
        ),
    ),
    ffn=FFNNeurons(
        expand=("mlp.gate_up_proj",), contract="mlp.down_proj", activation="swiglu", fused_parts=("gate", "up")
    ),
    norms=("input_layernorm", "post_attention_layernorm"),
    rotary=True,
    fused=(QKV, GATE_UP),
)
