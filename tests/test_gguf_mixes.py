"""llama.cpp's mix rules (export/gguf/mixes.py) against expectations written by hand from llama-quant.cpp's rules
(/work/shared/notes/gguf-export.md §3), including the shape fallbacks of SmolLM2-like widths."""

from __future__ import annotations

import pytest
import torch

from conftest import make_llama
from lowbit.errors import LowbitError
from lowbit.export.gguf.mixes import fallback_type, mix_type, resolve_mix, use_more_bits
from lowbit.scheme import parse_scheme


def test_use_more_bits_layers():
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert [i for i in range(18) if use_more_bits(i, 18)] == [0, 1, 4, 7, 10, 13, 15, 16, 17]


@pytest.mark.parametrize(
    "mix,kind,layer,n_layer,gqa,expected",
    [
        ("q4_k_m", "attn_q", 0, 32, 4, "q4_k"),
        ("q4_k_m", "attn_v", 0, 32, 4, "q6_k"),
        ("q4_k_m", "attn_v", 4, 32, 4, "q4_k"),
        ("q4_k_m", "attn_v", 6, 32, 4, "q6_k"),  # (6 - 4) % 3 == 2
        ("q4_k_m", "ffn_down", 31, 32, 4, "q6_k"),
        ("q4_k_m", "attn_output", 0, 32, 4, "q4_k"),
        ("q5_k_m", "ffn_down", 0, 32, 1, "q6_k"),
        ("q5_k_m", "ffn_gate", 0, 32, 1, "q5_k"),
        ("q4_k_s", "attn_v", 3, 32, 1, "q5_k"),
        ("q4_k_s", "attn_v", 4, 32, 1, "q4_k"),
        ("q4_k_s", "ffn_down", 3, 32, 1, "q5_k"),
        ("q4_k_s", "ffn_down", 4, 32, 1, "q4_k"),
        ("q3_k_m", "attn_v", 1, 32, 1, "q5_k"),
        ("q3_k_m", "attn_v", 2, 32, 1, "q4_k"),
        ("q3_k_m", "ffn_down", 1, 32, 1, "q5_k"),
        ("q3_k_m", "ffn_down", 2, 32, 1, "q4_k"),
        ("q3_k_m", "attn_output", 9, 32, 1, "q4_k"),
        ("q3_k_m", "ffn_up", 9, 32, 1, "q3_k"),
        ("q2_k_s", "attn_v", 9, 32, 4, "q4_k"),
        ("q2_k_s", "attn_v", 9, 32, 3, "q2_k"),
        ("q2_k_s", "ffn_down", 3, 32, 1, "q4_k"),
        ("q2_k_s", "ffn_down", 4, 32, 1, "q2_k"),
    ],
)
def test_mix_rules(mix, kind, layer, n_layer, gqa, expected):
    assert mix_type(mix, kind, layer, n_layer, gqa) == expected


def test_shape_fallbacks():
    assert [fallback_type(t, 576) for t in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")] == [
        "iq4_nl", "iq4_nl", "q5_0", "q5_1", "q8_0"]  # fmt: skip
    assert fallback_type("q4_k", 1536) == "q4_k" and fallback_type("q4_0", 96) == "q4_0"
    with pytest.raises(LowbitError, match="not a multiple of 32"):
        fallback_type("q4_k", 80)


def test_smollm2_shaped_q4_k_m_is_mostly_legacy():
    """30 layers, hidden 576 (not a multiple of 256), FFN 1536, 9 / 3 heads: only ffn_down can be a K type."""
    linears = {}
    for i in range(30):
        for kind, k in (("attn_q", 576), ("attn_k", 576), ("attn_v", 576), ("attn_output", 576), ("ffn_gate", 576),
                        ("ffn_up", 576), ("ffn_down", 1536)):  # fmt: skip
            linears[f"model.layers.{i}.{kind}"] = (kind, i, k)
    types = resolve_mix("q4_k_m", linears, 30, 3)
    assert types["model.layers.0.attn_q"] == "q5_0" and types["model.layers.0.attn_v"] == "q8_0"
    assert types["model.layers.3.attn_v"] == "q5_0" and types["model.layers.3.ffn_down"] == "q4_k"
    assert types["model.layers.5.ffn_down"] == "q6_k" and types["model.layers.29.ffn_up"] == "q5_0"
    assert sorted(set(types.values())) == ["q4_k", "q5_0", "q6_k", "q8_0"]


def test_unknown_mix():
    with pytest.raises(LowbitError, match="unknown GGUF mix"):
        mix_type("q4_k_x", "attn_v", 0, 2, 1)


def test_fused_qkv_gets_llama_cpps_types():
    """llama-quant.cpp's attn_qkv rule (Phi-3): Q4_K under Q3_K_M, Q5_K under Q4_K_M, Q6_K under Q5_K_M."""
    assert [mix_type(m, "attn_qkv", 0, 32, 1) for m in ("q2_k_s", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_m")] == [
        "q2_k", "q4_k", "q4_k", "q5_k", "q6_k",
    ]  # fmt: skip


def test_moe_rules():
    """Stacked experts follow their kind's rules by layer (ffn_down_exps as ffn_down); with 8 experts llama-quant.cpp
    makes attn_v and attn_k Q8_0 and attn_output Q5_K under Q3_K_M / Q4_K_S / Q4_K_M."""
    assert mix_type("q4_k_m", "ffn_down_exps", 0, 48, 8, n_expert=128) == "q6_k"
    assert mix_type("q4_k_m", "ffn_down_exps", 10, 48, 8, n_expert=128) == "q4_k"
    assert mix_type("q4_k_m", "ffn_gate_exps", 0, 48, 8, n_expert=128) == "q4_k"
    assert mix_type("q4_k_m", "attn_v", 10, 48, 8, n_expert=128) == "q4_k"
    assert [mix_type(m, "attn_v", 5, 32, 4, n_expert=8) for m in ("q2_k_s", "q4_k_m")] == ["q8_0", "q8_0"]
    assert mix_type("q2_k_s", "attn_k", 5, 32, 4, n_expert=8) == "q8_0"
    assert [mix_type(m, "attn_output", 5, 32, 4, n_expert=8) for m in ("q2_k_s", "q3_k_m", "q4_k_m", "q5_k_m")] == [
        "q2_k", "q5_k", "q5_k", "q5_k",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "default, row, output, embedding",
    [("q4_1", 576, "q8_0", "q4_1"),  # SmolLM2's shipped Q4_1 file: tied token_embd Q6_K -> Q8_0 (576 % 256)
     ("q4_k", 4096, "q6_k", "q4_k"),  # a Llama Q4_K_M: output Q6_K, untied token_embd Q4_K
     ("q4_k", 640, "q8_0", "q5_0"),  # 640 % 256: the output rule's Q8_0, the embedding's Q4_K falls back to Q5_0
     ("q8_0", 4096, "q8_0", "q8_0"),  # a Q8_0 file keeps Q8_0 for the output
     ("q2_k", 4096, "q6_k", "q2_k"),
     ("q4_0", 100, None, None)],  # no block type holds the row: float
)  # fmt: skip
def test_output_and_embedding_types_follow_llama_cpp(default, row, output, embedding):
    from lowbit.export.gguf.embeddings import output_type, shape_fallback

    assert output_type(default, row) == output
    assert shape_fallback(default, row) == embedding


def test_a_tied_embedding_gets_the_output_type_and_is_rounded_in_place():
    from lowbit.export.gguf.embeddings import outside_types, round_outside

    model = make_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    scheme = parse_scheme("gguf:q4_k_m")
    assert outside_types(model, scheme) == {"model.embed_tokens": "q8_0"}  # hidden 64: Q6_K falls back to Q8_0
    float_weight = model.get_input_embeddings().weight.detach().clone()
    records = round_outside(model, scheme)
    rounded = model.get_input_embeddings().weight
    assert torch.equal(rounded, records["model.embed_tokens"].dequantize()) and not torch.equal(rounded, float_weight)
    assert model.get_output_embeddings().weight is rounded  # the tie holds
    assert (rounded - float_weight).abs().max() <= float_weight.abs().amax(-1, keepdim=True).max() / 127


@pytest.mark.parametrize("gguf_type", ["q8_0", "q6_k"])
def test_rounding_by_row_chunks_equals_one_pass(monkeypatch, gguf_type):
    from lowbit.export.gguf import embeddings
    from lowbit.export.gguf.mixes import type_scheme
    from lowbit.quantizer import quantize_weight

    weight = torch.randn(10, 512, generator=torch.Generator().manual_seed(0))
    scheme = type_scheme(gguf_type)
    whole = quantize_weight(weight, scheme)
    monkeypatch.setattr(embeddings, "ROWS_PER_CHUNK", 3)
    chunked = embeddings.round_rows(weight, scheme)
    for key in ("codes", "scale", "zero"):
        assert torch.equal(getattr(chunked, key), getattr(whole, key)), key
