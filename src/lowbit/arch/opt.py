"""OPT family (pre-LN variants; OPT-350m is post-LN and is refused by the transform stages)."""

from lowbit.arch.base import ArchSpec, FFNNeurons, ScaleGroup

OPT = ArchSpec(
    family="opt",
    model_types=("opt",),
    blocks_path="model.decoder.layers",
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    ),
    scale_groups=(
        ScaleGroup(
            prev="self_attn_layer_norm",
            linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            prev_kind="norm",
            inspect="self_attn",
        ),
        ScaleGroup(
            prev="self_attn.v_proj",
            linears=("self_attn.out_proj",),
            prev_kind="linear",
            inspect="self_attn.out_proj",
            needs_same_shape=True,
            in_paper_teq=False,
        ),
        ScaleGroup(prev="final_layer_norm", linears=("fc1",), prev_kind="norm", inspect="fc1"),
        ScaleGroup(prev="fc1", linears=("fc2",), prev_kind="linear", inspect="fc2"),
    ),
    ffn=FFNNeurons(expand=("fc1",), contract="fc2", activation="relu"),
    norms=("self_attn_layer_norm", "final_layer_norm"),
    query_key=("self_attn.q_proj", "self_attn.k_proj"),
    attention_operands="token",
)
