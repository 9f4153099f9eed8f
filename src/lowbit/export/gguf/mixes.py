"""llama.cpp's quantization mixes (Q2_K_S, Q3_K_M, Q4_K_S, Q4_K_M, Q5_K_M): the GGUF type of each block linear.

A mirror of `llama_tensor_get_type_impl` and `tensor_type_fallback` in llama.cpp's `src/llama-quant.cpp` for dense
and mixture-of-experts models (stacked experts by their kind's rules, the 8-expert attention rules; no Falcon, no
70B special case). Pure functions:
the run resolves a mix per linear before any tuning (`mix_schemes`, handed to the stages), so each linear is tuned on
the grid it is stored on. Only block linears are typed here; the output and token embeddings are typed and rounded
by embeddings.py.
"""

from __future__ import annotations

from torch import nn

from lowbit.arch import ArchSpec
from lowbit.errors import LowbitError
from lowbit.export.gguf.arch import gguf_arch
from lowbit.formats.gguf_types import GGUF_MIXES, GGUF_TYPES
from lowbit.scheme import QuantScheme, gguf_type_scheme

# mix -> the type of every tensor no rule below overrides (llama_ftype_get_default_type)
MIX_DEFAULTS = {mix: default for mix, (default, _) in GGUF_MIXES.items()}

# K type -> the 32-block type llama.cpp writes when a row is not a multiple of 256 (tensor_type_fallback)
K_FALLBACK = {"q2_k": "iq4_nl", "q3_k": "iq4_nl", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}

# GGUF tensor kind (the part of `blk.N.<kind>.weight`) -> the category the rules name
CATEGORIES = {"attn_v": "attn_v", "ffn_down": "ffn_down", "attn_output": "attn_output", "attn_qkv": "attn_qkv",
              "attn_k": "attn_k", "ffn_down_exps": "ffn_down"}  # fmt: skip

# llama.cpp's 8-expert special cases (Mixtral-like): attn_v and attn_k to Q8_0, attn_output to Q5_K under these
EIGHT_EXPERT_OUTPUT_Q5_K = ("q3_k_m", "q4_k_s", "q4_k_m")

# a fused Q/K/V projection (Phi-3's attn_qkv) under each mix that gives it more bits
QKV_TYPES = {"q3_k_m": "q4_k", "q4_k_m": "q5_k", "q5_k_m": "q6_k"}


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's layers that get more bits in the _M mixes: the first and last eighth, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def mix_type(mix: str, kind: str, layer: int, n_layer: int, n_gqa: int, n_expert: int = 0) -> str:
    """The type llama.cpp gives tensor `kind` (attn_q, attn_v, ffn_down, ffn_down_exps, ...) of block `layer` under
    `mix`, before the shape fallback. `n_gqa` = attention heads / KV heads; `n_expert` = experts per MoE block (the
    stacked experts follow the dense rules of their kind, by layer; 8 experts have their own attention rules)."""
    if mix not in MIX_DEFAULTS:
        raise LowbitError(f"unknown GGUF mix {mix!r}: use one of {', '.join(MIX_DEFAULTS)}")
    category = CATEGORIES.get(kind)
    if n_expert == 8 and category in ("attn_v", "attn_k"):
        return "q8_0"
    if n_expert == 8 and category == "attn_output":
        return "q5_k" if mix in EIGHT_EXPERT_OUTPUT_Q5_K else MIX_DEFAULTS[mix]
    if category == "attn_v":
        if mix == "q2_k_s" and n_gqa >= 4:
            return "q4_k"
        if mix == "q3_k_m":
            return "q5_k" if layer < 2 else "q4_k"
        if mix in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n_layer):
            return "q6_k"
        if mix == "q4_k_s" and layer < 4:
            return "q5_k"
    elif category == "ffn_down":
        if mix == "q2_k_s" and layer < n_layer // 8:
            return "q4_k"
        if mix == "q3_k_m":
            return "q5_k" if layer < n_layer // 16 else "q4_k"
        if mix in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n_layer):
            return "q6_k"
        if mix == "q4_k_s" and layer < n_layer // 8:
            return "q5_k"
    elif category == "attn_output" and mix == "q3_k_m":
        return "q4_k"
    elif category == "attn_qkv" and mix in QKV_TYPES:
        return QKV_TYPES[mix]
    return MIX_DEFAULTS[mix]


def shape_fallback(gguf_type: str, row: int) -> str | None:
    """The type a row of `row` values can hold (llama.cpp's `tensor_type_fallback`): a K type falls back to a legacy
    one when the row is not a multiple of 256; None when no block type holds the row (llama.cpp writes F16)."""
    if GGUF_TYPES[gguf_type].block == 256 and row % 256:
        gguf_type = K_FALLBACK[gguf_type]
    return None if row % GGUF_TYPES[gguf_type].block else gguf_type


def fallback_type(gguf_type: str, in_features: int) -> str:
    """`shape_fallback` for a block linear, where a row no block type holds is refused (lowbit quantizes every block
    linear)."""
    fallback = shape_fallback(gguf_type, in_features)
    if fallback is None:
        raise LowbitError(
            f"a row of {in_features} values is not a multiple of 32, so no GGUF block type holds it: use "
            "--format compressed-tensors"
        )
    return fallback


def resolve_mix(
    mix: str, linears: dict[str, tuple[str, int, int]], n_layer: int, n_gqa: int, n_expert: int = 0
) -> dict[str, str]:
    """Per linear: `linears` maps a module name to (GGUF tensor kind, block index, in_features); returns its type."""
    return {
        name: fallback_type(mix_type(mix, kind, layer, n_layer, n_gqa, n_expert), k)
        for name, (kind, layer, k) in linears.items()
    }


def type_scheme(gguf_type: str, kind: str | None = None) -> QuantScheme:
    """The exact scheme of one GGUF type: `kind` where the type stores it, else the type's default kind."""
    t = GGUF_TYPES[gguf_type]
    return gguf_type_scheme(t, kind if kind in t.kinds else None)


def mix_schemes(model: nn.Module, arch: ArchSpec, scheme: QuantScheme) -> dict[str, QuantScheme]:
    """Each block linear's scheme under `scheme`'s mix (full module name -> scheme); {} for a single-type scheme.

    Raises LowbitError for a family GGUF cannot hold or a width no block type holds, so the run can call it in its
    preflight, before calibration."""
    mix = scheme.gguf_mix
    if mix is None:
        return {}
    names = gguf_arch(model)
    config = model.config
    n_gqa = config.num_attention_heads // (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    blocks = arch.blocks(model)
    linears = {}
    for index, block in enumerate(blocks):
        for name, linear in arch.linears(block).items():
            full = f"{arch.block_name(index)}.{name}"
            kind = names.tensor_name(f"{full}.weight").split(".")[2]
            linears[full] = (kind, index, int(linear.weight.shape[1]))
    n_expert = int(getattr(config, arch.experts.count_attr, 0) or 0) if arch.experts is not None else 0
    types = resolve_mix(mix, linears, len(blocks), n_gqa, n_expert)
    # `gguf:q4_k_m-sym` asks for the mix's K-quants with mins on their symmetric grid; other types keep their own
    default = scheme.gguf_type.kinds[0]  # type: ignore[union-attr]
    chosen = {t: scheme.kind if GGUF_TYPES[t].kinds[0] == default else None for t in set(types.values())}
    return {name: type_scheme(t, chosen[t]) for name, t in types.items()}
