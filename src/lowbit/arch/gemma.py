"""Gemma 2 and Gemma 3 (text): sandwich norms that scale by (1 + w), GELU-tanh gating, alternating sliding-window
and global attention layers (each block replays with its own layer's kwargs: engine/capture.py).

The FFN's input norm is `pre_feedforward_layernorm`; `post_attention_layernorm` and `post_feedforward_layernorm` sit
on the sub-layers' outputs and absorb no input scales. Gemma 3's q_norm/k_norm make q<->k scaling no equivalence.
Scaled embeddings and Gemma 2's soft-capping are outside the blocks' linears and need nothing here.
"""

from dataclasses import replace

from lowbit.arch.llama import LLAMA_LIKE

_FFN_NORM = "pre_feedforward_layernorm"

# The Llama block layout with the FFN's scales absorbed by the pre-FFN norm (not the post-attention one)
GEMMA2 = replace(
    LLAMA_LIKE,
    family="gemma2",
    model_types=("gemma2",),
    scale_groups=tuple(
        replace(group, prev=_FFN_NORM) if group.prev == "post_attention_layernorm" else group
        for group in LLAMA_LIKE.scale_groups
    ),
    ffn=replace(LLAMA_LIKE.ffn, activation="geglu"),
    norms=("input_layernorm", _FFN_NORM),
    norm_kind="one_plus",
    ffn_norm=_FFN_NORM,
    ffn_post_norm="post_feedforward_layernorm",
    window_bos=True,
)

GEMMA3 = replace(GEMMA2, family="gemma3", model_types=("gemma3_text",), qk_norm=True)
