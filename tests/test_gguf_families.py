"""GGUF export beyond Llama (issue 32): Qwen2 (biases), Qwen3 (q/k norms), Gemma 2 / 3 (norms stored as 1 + w,
embedding scale, soft-capping, sliding windows), Phi-3 (fused qkv / gate_up), Mistral as Llama.

Each family's tiny random model (weights and norms drawn so every part matters: O(1) logits, norms far from 1, biases
non-zero, a sliding window shorter than the input) is quantized and written; then llama.cpp itself (llama-cpp-python)
runs the file and its logits must match lowbit's fake-quant model's as closely as they do for Llama, the reference
family whose file transformers loads bit for bit (llama.cpp quantizes activations to 8 bits in its quantized dot
products, so its logits are close, never equal). Where transformers' GGUF loader restores the whole config, its
logits must equal lowbit's as for Llama.
"""

from __future__ import annotations

import copy
import math

import gguf
import numpy as np
import pytest
import torch

import lowbit
from conftest import save_model_dir
from lowbit.errors import LowbitError
from lowbit.export.gguf.arch import gguf_arch
from lowbit.formats.files import GGUF_FILE
from lowbit.run import ExportSettings

IDS = torch.arange(3, 43).unsqueeze(0)  # 40 tokens: past the sliding windows of 8 below

# family -> synthetic-config overrides; head_dim at transformers' defaults (Qwen3 128, Gemma 256) where its GGUF
# loader does not read the key, so the same file serves both checks
CASES = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {"sliding_window": None}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 128}),
    "phi3": ("phi3", {}),
    "gemma2": ("gemma2", {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 8}),
    "gemma2-softcap": ("gemma2", {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 8,
                                  "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0}),
    "gemma3": ("gemma3", {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 8}),
    "gemma3-linear-rope": ("gemma3", {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 8,
                                      "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                             "rope_theta": 1e6},
                                                          "sliding_attention": {"rope_type": "default",
                                                                                "rope_theta": 10000.0}}}),
    "qwen3_moe": ("qwen3_moe", {"head_dim": 128, "norm_topk_prob": True}),
}  # fmt: skip
# transformers 5's GGUF loader does not restore Gemma 2's soft-capping values (it keeps 50 / 30), nor Qwen3-MoE's
# moe_intermediate_size and norm_topk_prob (it keeps 768 and False, llama.cpp always renormalizes)
TRANSFORMERS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"]


def make_family(case: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of `case`: hidden 64, FFN 128, 4 heads / 2 KV heads, 2 blocks (Gemma 3: 6, so one is
    global), untied except Gemma; 1-D tensors (norms, biases) moved well away from their init."""
    from transformers import AutoModelForCausalLM

    from lowbit.synthetic import synthetic_config

    family, overrides = CASES[case]
    overrides = {"vocab_size": 384, **overrides}
    vocab = overrides.pop("vocab_size")
    config = synthetic_config(family, hidden_size=64, intermediate_size=128, num_layers=6 if family == "gemma3" else 2,
                              num_heads=4, num_kv_heads=2, vocab_size=vocab, dtype=torch.float32,
                              tie_word_embeddings=family.startswith("gemma"), overrides=overrides)  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.2)
            else:
                param.copy_(torch.randn_like(param) / math.sqrt(param.shape[-1]) * (4 if "embed" in name else 1))
    return model


def export(case: str, tmp_path, tokenizer, scheme: str = "gguf:q8_0", **kwargs):
    source = tmp_path / "src"  # not named after the family: llama.cpp special-cases Phi-3 by general.name
    if CASES[case][0] == "phi3":  # transformers' Phi-3 config defaults pad_token_id to 32000 unless the file names one
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token
    if not source.exists():
        save_model_dir(source, make_family(case), tokenizer)
    return lowbit.quantize_to(tmp_path / "out", model=str(source), recipe="rtn", scheme=scheme,
                              export=ExportSettings(format="gguf"), **kwargs)  # fmt: skip


def llama_cpp_logits(path, ids: torch.Tensor) -> torch.Tensor:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_batch=64, n_threads=1, verbose=False)
    try:
        llm.eval(ids[0].tolist())
        return torch.tensor(np.array(llm.scores[: ids.shape[1]]), dtype=torch.float32)
    finally:
        llm.close()


@pytest.mark.parametrize("case", list(CASES))
def test_llama_cpp_runs_the_file_as_lowbit_evaluated_it(case, tmp_path, tokenizer):
    pytest.importorskip("llama_cpp")
    result = export(case, tmp_path, tokenizer)
    with torch.no_grad():
        expected = result.model(IDS).logits[0]
    got = llama_cpp_logits(tmp_path / "out" / GGUF_FILE, IDS)
    # Llama's gap on this input is ~0.09 at logit std ~1 (8-bit activations); a wrong norm, scale, cap, window or
    # row order moves logits by O(1)
    gap = float((got - expected).abs().max())
    assert gap < 0.1 * max(1.0, float(expected.std())), gap
    assert float((got.argmax(-1) == expected.argmax(-1)).float().mean()) >= 0.9


@pytest.mark.parametrize("case", TRANSFORMERS)
def test_transformers_loads_the_file_with_lowbits_logits(case, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    result = export(case, tmp_path, tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, result.model(IDS).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["qwen2", "gemma2", "phi3"])
def test_every_tensor_decodes_to_what_lowbit_evaluated(case, tmp_path, tokenizer):
    """Quantized tensors decode to the records; Gemma's norms are stored as 1 + w, in float32; biases as they are."""
    result = export(case, tmp_path, tokenizer, scheme="gguf:q4_k_m")
    reader = gguf.GGUFReader(tmp_path / "out" / GGUF_FILE)
    tensors = {t.name: t for t in reader.tensors}
    arch = gguf_arch(result.model)
    state = result.model.state_dict()
    for key, value in state.items():
        if key == "lm_head.weight" and "output.weight" not in tensors:
            continue
        name = arch.tensor_name(key)
        decoded = gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type).reshape(value.shape)
        expected = value.float() + (1.0 if case == "gemma2" and key.endswith("norm.weight") else 0.0)
        assert np.array_equal(decoded, expected.numpy()), name
    fields = {key: field.contents() for key, field in reader.fields.items()}
    assert fields["general.architecture"] == gguf.MODEL_ARCH_NAMES[arch.arch]
    if case == "gemma2":
        assert fields["gemma2.attention.sliding_window"] == 8
        assert fields["gemma2.attn_logit_softcapping"] == 50.0
    if case == "phi3":  # llama.cpp's attn_qkv rule of the mix (rows of 64 fall back from Q5_K to Q5_1)
        assert tensors["blk.0.attn_qkv.weight"].tensor_type == gguf.GGMLQuantizationType.Q5_1
        assert "blk.0.ffn_up.weight" in tensors and "blk.0.ffn_gate.weight" not in tensors


@pytest.mark.parametrize(
    "case,overrides,words",
    [
        ("gemma2", {"attn_logit_softcapping": None}, "soft-caps"),
        ("gemma2", {"query_pre_attn_scalar": 144}, "query_pre_attn_scalar 144"),
        ("qwen2", {"use_sliding_window": True}, "sliding-window"),
        ("mistral", {"sliding_window": 16}, "sliding_window 16"),
        ("phi3", {"sliding_window": 16}, "sliding_window 16"),
        ("qwen3_moe", {"norm_topk_prob": False}, "norm_topk_prob"),
    ],
)
def test_what_llama_cpp_would_run_differently_is_refused_before_calibration(
    case, overrides, words, tmp_path, tokenizer, monkeypatch
):
    def forbidden(*_args, **_kwargs):
        raise AssertionError("calibration started before the export was refused")

    monkeypatch.setattr("lowbit.run.run_quantization", forbidden)
    family, base = CASES[case]
    CASES["refused"] = (family, {**base, **overrides})
    try:
        with pytest.raises(LowbitError, match=words):
            export("refused", tmp_path, tokenizer)
    finally:
        del CASES["refused"]
    assert not (tmp_path / "out").exists()


def test_qwen3_moe_experts_are_stacked(tmp_path, tokenizer):
    """Each block's experts are one 3-D tensor per kind, expert e's rows decoding to expert e's record."""
    from lowbit.export.gguf.arch import family_support

    result = export("qwen3_moe", tmp_path, tokenizer, scheme="gguf:q4_0")
    reader = gguf.GGUFReader(tmp_path / "out" / GGUF_FILE)
    tensors = {t.name: t for t in reader.tensors}
    down = tensors["blk.1.ffn_down_exps.weight"]
    assert down.tensor_type == gguf.GGMLQuantizationType.Q4_0
    decoded = gguf.quants.dequantize(down.data, down.tensor_type)
    assert decoded.shape == (8, 64, 128)
    for e in range(8):
        assert np.array_equal(decoded[e], result.weights[f"model.layers.1.mlp.experts.{e}.down_proj"].dequantize())
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert family_support(("qwen3_moe",)) == "yes"


def test_qwen3_moe_mix_follows_llama_cpps_moe_rules(tmp_path, tokenizer):
    """q4_k_m on 8 experts: attn_v/attn_k Q8_0, attn_output Q5_K, ffn_down_exps Q6_K on the use_more_bits layer
    (attn_output rows are 512; rows of 64 / 128 fall back to Q5_0 / Q8_0); llama.cpp runs the file."""
    pytest.importorskip("llama_cpp")
    result = export("qwen3_moe", tmp_path, tokenizer, scheme="gguf:q4_k_m")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "out" / GGUF_FILE).tensors}
    assert types["blk.0.attn_v.weight"] == types["blk.0.attn_k.weight"] == "Q8_0"
    assert types["blk.0.attn_output.weight"] == "Q5_K" and types["blk.0.attn_q.weight"] == "Q5_0"  # rows 512, 64
    assert (types["blk.0.ffn_down_exps.weight"], types["blk.1.ffn_down_exps.weight"]) == ("Q5_0", "Q8_0")
    with torch.no_grad():
        expected = result.model(IDS).logits[0]
    got = llama_cpp_logits(tmp_path / "out" / GGUF_FILE, IDS)
    # a router near a tie picks another expert under llama.cpp's arithmetic for the odd token, and attention carries
    # that to the positions after it (here one flip at position 28 of 40): count positions, not the max
    close = (got - expected).abs().amax(-1) < 0.1 * max(1.0, float(expected.std()))
    assert float(close.float().mean()) >= 0.75, close


@pytest.mark.parametrize("case", ["gemma2", "phi3", "qwen3_moe"])
def test_streamed_run_writes_the_same_tensors(case, tmp_path, tokenizer):
    """A streamed run packs block by block with the same per-family rules (Gemma's 1 + w norms, Phi-3's fused rows,
    Qwen3-MoE's stacked experts)."""
    files = {}
    for stream in ("off", "on"):
        export(case, tmp_path, tokenizer, options={"engine": {"stream": stream}})
        reader = gguf.GGUFReader(tmp_path / "out" / GGUF_FILE)
        files[stream] = [(t.name, t.tensor_type, t.data.tobytes()) for t in reader.tensors]
        (tmp_path / "out").rename(tmp_path / f"out-{stream}")
    assert files["on"] == files["off"]


@pytest.mark.parametrize("case", list(CASES))
def test_float_file_runs_in_llama_cpp_like_transformers(case, tmp_path, tokenizer):
    """The writer's structure alone (names, row order, norms, keys), with llama.cpp's quantized arithmetic taken out:
    every tensor written in float32 (lowbit's plan with no quantized linear), llama.cpp's logits within 0.01 of the
    transformers model's (its fp16 KV cache is what is left)."""
    from lowbit.arch import arch_for
    from lowbit.export.gguf.tensors import plan_tensors
    from lowbit.export.gguf.vocab import build_vocab
    from lowbit.export.gguf.writer import PreparedGguf, write_file

    pytest.importorskip("llama_cpp")
    model = make_family(case)
    arch_for(model).prepare(model)  # fused experts as the per-expert linears lowbit writes
    arch = gguf_arch(model)
    vocab = build_vocab(tokenizer, int(model.config.vocab_size))
    prepared = PreparedGguf(model, {}, arch, vocab, plan_tensors(model, arch, {}), gguf.LlamaFileType.ALL_F32)
    write_file(tmp_path / GGUF_FILE, prepared, {"config": {}})
    with torch.no_grad():
        expected = model(IDS).logits[0]
    got = llama_cpp_logits(tmp_path / GGUF_FILE, IDS)
    assert float((got - expected).abs().max()) < 0.01 * max(1.0, float(expected.std()))
