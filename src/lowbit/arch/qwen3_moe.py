"""Qwen3-MoE: the Qwen3 block (q_norm/k_norm) with a sparse MoE FFN: a top-k softmax router `mlp.gate` and fused
experts `mlp.experts.gate_up_proj` [E, 2I, H] ([gate; up] rows) and `mlp.experts.down_proj` [E, H, I].

The experts are quantized as per-expert linears with the hub's names (`mlp.experts.N.gate_proj`, arch/moe.py); the
router stays float. Layers listed in `mlp_only_layers` (or off the `decoder_sparse_step`) are dense Qwen3 FFNs and
keep the Qwen3 layout. Qwen3-MoE has no shared expert (Qwen2-MoE's `shared_expert` would go in `shared`).
"""

from dataclasses import replace

from lowbit.arch.llama import QWEN3
from lowbit.arch.moe import ExpertParam, ExpertsSpec

QWEN3_MOE_EXPERTS = ExpertsSpec(
    path="mlp.experts",
    router="mlp.gate",
    params=(ExpertParam("gate_up_proj", ("gate_proj", "up_proj")), ExpertParam("down_proj", ("down_proj",))),
    sequential=(("gate_proj", "up_proj"), ("down_proj",)),
)

QWEN3_MOE = replace(QWEN3, family="qwen3-moe", model_types=("qwen3_moe",), experts=QWEN3_MOE_EXPERTS)
