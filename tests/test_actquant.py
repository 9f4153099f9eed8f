"""Weight-activation schemes: activation quantizers (omniquant.md §7), engine chain, evaluation, exports."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import lowbit
from conftest import make_llama, make_opt, save_model_dir
from lowbit.actquant import (
    ACT_KIND,
    _attend,
    act_bits_of,
    activation_quant,
    install_activation_quant,
    quantize_activation,
)
from lowbit.arch import arch_for
from lowbit.cli import main
from lowbit.data import load_eval
from lowbit.engine import EngineOptions, NoOptions, call_block, capture_block_inputs, run_block_stages
from lowbit.errors import LowbitError
from lowbit.eval import perplexity
from lowbit.formats.files import RECORD_FILE
from lowbit.models import load_model
from lowbit.scheme import parse_scheme
from stages_for_tests import RecordingRTN

IDS = torch.arange(3, 43).unsqueeze(0)
BITS = 4


def run_cli(*args: object) -> int:
    return main([*map(str, args)])


def captured(model, n: int = 2, seqlen: int = 12):
    torch.manual_seed(1)
    ids = torch.randint(0, 300, (n, seqlen))
    return capture_block_inputs(model, arch_for(model), ids, batch_size=n, device=torch.device("cpu"))


def _heads(x: torch.Tensor, d: int) -> torch.Tensor:
    b, n, _ = x.shape
    return x.view(b, n, -1, d).transpose(1, 2)


def _causal_attention(q, k, v, scaling):
    """P = softmax(q k^T) in fp32, never quantized; heads merged back."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    n = q.shape[2]
    mask = torch.full((n, n), float("-inf")).triu(1)
    probs = torch.softmax(q @ k.transpose(2, 3) * scaling + mask, dim=-1, dtype=torch.float32)
    out = probs @ v
    return out.transpose(1, 2).reshape(q.shape[0], n, -1)


def llama_reference(block, x, kwargs, bits):
    """A LLaMA block written out with every §7 quantization point explicit."""

    def q(t):
        return quantize_activation(t, bits)

    attn, mlp = block.self_attn, block.mlp
    n = q(block.input_layernorm(x))
    d = attn.head_dim
    query, key = _heads(attn.q_proj(n), d), _heads(attn.k_proj(n), d)
    value = _heads(attn.v_proj(n), d)
    cos, sin = kwargs["position_embeddings"]
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    out = _causal_attention(q(query), q(key), q(value), attn.scaling)  # per (head, token) after RoPE
    h = x + attn.o_proj(q(out))
    m = q(block.post_attention_layernorm(h))
    return h + mlp.down_proj(q(F.silu(mlp.gate_proj(m)) * mlp.up_proj(m)))


def opt_reference(block, x, _kwargs, bits):
    """An OPT block written out: q (after 1/sqrt(d)), k, v quantized per token across all heads."""

    def q(t):
        return quantize_activation(t, bits)

    attn = block.self_attn
    n = q(block.self_attn_layer_norm(x))
    query = q(attn.q_proj(n) * attn.scaling)
    key, value = q(attn.k_proj(n)), q(attn.v_proj(n))
    d = attn.head_dim
    out = _causal_attention(_heads(query, d), _heads(key, d), _heads(value, d), 1.0)
    h = x + attn.out_proj(q(out))
    m = q(block.final_layer_norm(h))
    return h + block.fc2(q(F.relu(block.fc1(m))))


REFERENCES = {"llama": (make_llama, llama_reference), "opt": (make_opt, opt_reference)}
MODELS = {"llama": make_llama, "llama-gqa": lambda: make_llama(kv_heads=2), "opt": make_opt}


# ----------------------------------------------------------------------------------------------------------
# the quantizers themselves


@pytest.mark.parametrize("family", ["llama", "llama-gqa", "opt"])
def test_block_output_equals_manual_per_token_quantization(family):
    model = MODELS[family]()
    reference = REFERENCES[family.split("-")[0]][1]
    inputs = captured(model)
    block = arch_for(model).blocks(model)[0]
    with torch.no_grad():
        expected = reference(block, inputs.hidden, inputs.kwargs, BITS)
        with activation_quant(block, arch_for(model), BITS):
            got = call_block(block, inputs.hidden, inputs.kwargs)
        plain = call_block(block, inputs.hidden, inputs.kwargs)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the quantization really happened


@pytest.mark.parametrize("family", ["llama", "llama-gqa", "opt"])
def test_census_every_point_of_section_7_exactly_once_and_never_p(family):
    model = MODELS[family]()
    arch = arch_for(model)
    events: list[tuple[str, bool]] = []
    with torch.no_grad(), activation_quant(model, arch, BITS, observer=lambda p, s: events.append((p, s))):
        model(IDS)
    uses = Counter(point for point, _ in events)
    expected = set()
    for index in range(len(arch.blocks(model))):
        prefix = arch.block_name(index)
        expected |= {f"{prefix}.{name}" for name in arch.linear_names}
        expected |= {f"{prefix}.{arch.attention}.{which}" for which in ("query", "key", "value")}
    assert set(uses) == expected  # nothing else (no P, no residual, norm, embedding or lm_head)
    assert set(uses.values()) == {1}
    # q/k/v share one quantization of the norm output, gate/up (or fc1 alone) theirs: 4 distinct linear inputs
    distinct = [point for point, shared in events if not shared and not point.endswith(("query", "key", "value"))]
    assert len(distinct) == 4 * len(arch.blocks(model)), distinct


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_softmax_output_is_not_quantized(family):
    """P (the attention weights) is fp32 and off any 4-bit grid: its last row has more values than 2^4 levels."""
    model = MODELS[family]()
    arch = arch_for(model)
    seen = []
    block = arch.blocks(model)[0]
    hook = block.self_attn.register_forward_hook(lambda _m, _args, out: seen.append(out[1]))
    with torch.no_grad(), activation_quant(model, arch, BITS):
        model(IDS)
    hook.remove()
    probs = seen[0]
    assert probs.dtype == torch.float32
    assert len(torch.unique(probs[0, 0, -1])) > 2**BITS


def test_attend_matches_sdpa_for_every_mask_form():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    module = torch.nn.Module().eval()
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
    bool_mask = causal[None, None].expand(2, 1, 6, 6)
    float_mask = torch.zeros(2, 1, 6, 6).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    for mask in (None, bool_mask, float_mask):
        got, probs = _attend(module, q, k, v, mask, None, 0.0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert probs.dtype == torch.float32


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_gradients_flow_through_functional_call_and_the_ste(family):
    model = MODELS[family]()
    arch = arch_for(model)
    inputs = captured(model)
    block = arch.blocks(model)[0]
    params = {name: p.detach().clone().requires_grad_(True) for name, p in block.named_parameters()}
    with activation_quant(block, arch, BITS):
        out = functional_call(block, params, (inputs.hidden,), inputs.kwargs)
    (out[0] if isinstance(out, tuple) else out).square().mean().backward()
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in block.parameters())  # the module's own parameters were not used


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_everything_is_restored_on_exit_and_16_bits_is_a_no_op(family):
    model = MODELS[family]()
    arch = arch_for(model)
    attention = arch.blocks(model)[0].self_attn
    config = attention.config
    with torch.no_grad():
        plain = model(IDS).logits
        with activation_quant(model, arch, 16):
            assert torch.equal(model(IDS).logits, plain)
        with pytest.raises(RuntimeError, match="inside"), activation_quant(model, arch, BITS):
            assert attention.config is not config and model.config._attn_implementation == "sdpa"
            raise RuntimeError("inside")
        assert torch.equal(model(IDS).logits, plain)
    assert attention.config is config and act_bits_of(model) == 16
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_install_twice_is_refused_and_the_same_bits_context_is_a_no_op():
    model = make_llama()
    arch = arch_for(model)
    handle = install_activation_quant(model, arch, BITS)
    with torch.no_grad():
        installed = model(IDS).logits
        with activation_quant(model, arch, BITS):  # no second quantization
            assert torch.equal(model(IDS).logits, installed)
    with pytest.raises(LowbitError, match="already installed"):
        install_activation_quant(model, arch, BITS)
    with pytest.raises(LowbitError, match="installed already"), activation_quant(model, arch, 6):
        pass
    handle.remove()
    handle.remove()
    assert act_bits_of(model) == 16


def test_kv_cache_generation_matches_the_full_forward():
    """Cached k/v rows are quantized per row, so incremental decoding agrees with a full forward."""
    model = make_llama()
    arch = arch_for(model)
    with torch.no_grad(), activation_quant(model, arch, BITS):
        generated = model.generate(IDS[:, :8], max_new_tokens=6, do_sample=False, pad_token_id=0)
        full = model(generated).logits
    assert torch.equal(full[0, 7:-1].argmax(-1), generated[0, 8:])


# ----------------------------------------------------------------------------------------------------------
# engine, evaluation and records


def test_engine_chains_the_w_a_block_output_and_keeps_float_targets(tokenizer):
    model = make_llama()
    float_model = make_llama()
    arch = arch_for(model)
    scheme = parse_scheme("w4a4")
    stage = RecordingRTN(NoOptions(), scheme)
    calibration = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    options = EngineOptions(batch_size=2, progress=False)
    run_block_stages(model, arch, [stage], scheme, calibration, options, seed=0)
    kwargs = capture_block_inputs(float_model, arch, calibration, batch_size=2, device=torch.device("cpu")).kwargs
    block0 = arch.blocks(model)[0]
    with torch.no_grad():
        with activation_quant(block0, arch, BITS):
            chained = call_block(block0, stage.seen[0]["inputs"], kwargs)
        weight_only = call_block(block0, stage.seen[0]["inputs"], kwargs)
        target = call_block(arch.blocks(float_model)[0], stage.seen[0]["fp_inputs"], kwargs)
    torch.testing.assert_close(stage.seen[1]["inputs"], chained, rtol=0, atol=1e-6)
    assert (stage.seen[1]["inputs"] - weight_only).abs().max() > 1e-3
    torch.testing.assert_close(stage.seen[0]["targets"], target, rtol=0, atol=1e-6)
    assert act_bits_of(model) == 16  # nothing left installed by the engine


@pytest.fixture(scope="module")
def w4a4(tmp_path_factory, tokenizer):
    """RTN W4A4 of the tiny Llama, its fake export, and the in-memory logits."""
    tmp = tmp_path_factory.mktemp("w4a4")
    source = save_model_dir(tmp / "src", make_llama(), tokenizer)
    result = lowbit.quantize(load_model(str(source)), recipe="rtn", scheme="w4a4")
    with torch.no_grad():
        logits = result.model(IDS).logits
    out = result.save(tmp / "fake")
    return result, logits, out


def test_w_a_result_differs_from_its_weight_only_twin(w4a4):
    result, logits, _ = w4a4
    assert result.record["activation"] == {"bits": 4, "kind": ACT_KIND}
    assert result.config.scheme.act_bits == 4 and act_bits_of(result.model) == 4
    result.act_quant.remove()
    try:
        with torch.no_grad():
            twin = result.model(IDS).logits
        assert (twin - logits).abs().max() > 1e-3
        with activation_quant(result.model, arch_for(result.model), 4), torch.no_grad():
            assert torch.equal(result.model(IDS).logits, logits)
    finally:
        result.act_quant = install_activation_quant(result.model, arch_for(result.model), 4)


def test_perplexity_applies_activation_quant_even_after_removal(w4a4, text_file):
    result, *_ = w4a4
    with_act = result.perplexity(str(text_file), seqlen=32, max_windows=2)
    result.act_quant.remove()
    try:
        assert result.perplexity(str(text_file), seqlen=32, max_windows=2) == with_act
        ids = load_eval(result.tokenizer, str(text_file)).input_ids
        weight_only = perplexity(result.model, ids, seqlen=32, max_windows=2, progress=False)
        assert weight_only.ppl != with_act.ppl
    finally:
        result.act_quant = install_activation_quant(result.model, arch_for(result.model), 4)


def test_fake_export_reloads_with_activation_quant(w4a4):
    _, logits, out = w4a4
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["activation"] == {"bits": 4, "kind": ACT_KIND}
    assert record["config"]["scheme"]["act_bits"] == 4
    loaded = lowbit.load(out)
    assert act_bits_of(loaded.model) == 4
    with torch.no_grad():
        assert torch.equal(loaded.model(IDS).logits, logits)


def test_lowbit_eval_on_a_w_a_fake_export(w4a4, text_file, tmp_path, capsys):
    result, _, out = w4a4
    report = tmp_path / "eval.json"
    assert run_cli("eval", out, "--ppl", text_file, "--eval-seqlen", 32, "--eval-windows", 2, "--json", report) == 0
    printed = capsys.readouterr().out
    assert "activation quantization on: 4-bit" in printed
    expected = result.perplexity(str(text_file), seqlen=32, max_windows=2).ppl
    assert f"{expected:.3f}" in printed
    assert json.loads(report.read_text())["activation"] == {"bits": 4, "kind": ACT_KIND}


def test_cli_rtn_w4a4_end_to_end(tiny_opt_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = run_cli(
        "quantize", tiny_opt_dir, "--recipe", "rtn", "--scheme", "w4a4", "--out", out,
        "--eval", "--eval-dataset", text_file, "--eval-seqlen", 32, "--eval-windows", 2,
    )  # fmt: skip
    assert code == 0
    assert "rtn w4a4" in capsys.readouterr().out
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["activation"] == {"bits": 4, "kind": ACT_KIND}
    after = next(iter(record["evaluation"]["after"].values()))["ppl"]
    assert run_cli("eval", out, "--ppl", text_file, "--eval-seqlen", 32, "--eval-windows", 2) == 0
    assert f"{after:.3f}" in capsys.readouterr().out


def test_gptq_w_a_runs_through_the_api(tiny_llama_dir, text_file):
    result = lowbit.quantize(
        str(tiny_llama_dir), recipe="gptq", scheme="w4a6", dataset=str(text_file), nsamples=4, seqlen=32
    )
    assert result.record["activation"]["bits"] == 6 and act_bits_of(result.model) == 6
    assert all(record.scheme.group_size == -1 for record in result.weights.values())


# ----------------------------------------------------------------------------------------------------------
# refusals: one message, exit status 2, no output directory, before any model is loaded


def assert_refused(capsys, tmp_path, args, message):
    out = tmp_path / "never"
    assert run_cli(*args, "--out", out) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], errors
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


@pytest.mark.parametrize(
    ("scheme", "fmt", "message"),
    [
        ("w4a4", "compressed-tensors", "simulation only"),
        ("w3a4", "gptq", "simulation only"),
        ("w6a6", "compressed-tensors", "--format fake"),
        ("w8a8", "gptq", "GPTQ checkpoints are weight-only"),
        ("w8a8-asym", "compressed-tensors", "symmetric per-channel"),
        ("w8a8g32", "compressed-tensors", "symmetric per-channel"),
        ("w4a8", "compressed-tensors", "8-bit symmetric"),
    ],
)
def test_packed_format_refusals_come_before_loading(tmp_path, capsys, scheme, fmt, message):
    missing = tmp_path / "no-such-model"  # the refusal must come first, so the model is never looked at
    assert_refused(capsys, tmp_path, ["quantize", missing, "--scheme", scheme, "--format", fmt], message)


@pytest.mark.parametrize("recipe", ["signround", "awq+rtn", "teq+gptq"])
def test_stages_without_w_a_support_are_refused(tmp_path, capsys, recipe):
    missing = tmp_path / "no-such-model"
    args = ["quantize", missing, "--recipe", recipe, "--scheme", "w4a4"]
    assert_refused(capsys, tmp_path, args, f"stage '{recipe.split('+')[0]}' does not support weight-activation")


def test_api_save_refuses_a_packed_w4a4(w4a4, tmp_path):
    result, *_ = w4a4
    with pytest.raises(LowbitError, match="simulation only"):
        result.save(tmp_path / "ct", format="compressed-tensors")
    assert not (tmp_path / "ct").exists()


# ----------------------------------------------------------------------------------------------------------
# W8A8: compressed-tensors int-quantized, loaded by transformers + compressed-tensors (no lowbit import)


def _served_reference(model, arch) -> torch.Tensor:
    """Weight-only model + compressed-tensors' dynamic *symmetric* int8 on every linear input.

    compressed-tensors' "token" strategy reduces every dim but the first two: per token on [b, L, h] inputs, but
    per tensor on the 2-D [b*L, h] inputs OPT's FFN linears get (vLLM flattens tokens and stays per token).
    """

    def hook(_module, args):
        x = args[0]
        dims = tuple(range(2, x.dim())) or tuple(range(x.dim()))
        amax = torch.maximum(x.amin(dims, keepdim=True).clamp(max=0).abs(), x.amax(dims, keepdim=True).clamp(min=0))
        scale = amax / 127.5
        return (torch.clamp(torch.round(x / scale), -128, 127) * scale,)

    handles = [
        block.get_submodule(name).register_forward_pre_hook(hook)
        for block in arch.blocks(model)
        for name in arch.linear_names
    ]
    try:
        with torch.no_grad():
            return model(IDS).logits
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture(scope="module")
def w8a8_exports(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("w8a8")
    built = {}
    for family, make in (("llama", make_llama), ("opt", make_opt)):
        source = save_model_dir(tmp / f"src-{family}", make(), tokenizer)
        result = lowbit.quantize(load_model(str(source)), recipe="rtn", scheme="w8a8")
        with torch.no_grad():
            simulated = result.model(IDS).logits
        out = result.save(tmp / family, format="compressed-tensors")
        result.act_quant.remove()
        with torch.no_grad():
            weight_only = result.model(IDS).logits
        served = _served_reference(result.model, arch_for(result.model))
        built[family] = (out, result, simulated, weight_only, served)
    script = Path(__file__).with_name("thirdparty_ct_load.py")
    dirs = [str(entry[0]) for entry in built.values()]
    done = subprocess.run([sys.executable, str(script), *dirs], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {family: (*entry, torch.load(entry[0] / "thirdparty.pt")) for family, entry in built.items()}


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_w8a8_int_quantized_loads_in_transformers_compressed_tensors(family, w8a8_exports):
    out, result, simulated, weight_only, served, thirdparty = w8a8_exports[family]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "int-quantized"
    group = config["config_groups"]["group_0"]
    assert group["input_activations"] == {
        "num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "group_size": None,
        "dynamic": True, "actorder": None, "observer": None, "block_structure": None,
    }  # fmt: skip
    assert group["weights"]["strategy"] == "channel" and group["weights"]["symmetric"] is True
    tolerance = 1e-3 * float(weight_only.abs().max())
    # decompressed weights alone are lowbit's weights; the served model adds symmetric int8 activations
    torch.testing.assert_close(thirdparty["dequantized_logits"], weight_only, rtol=0, atol=tolerance)
    torch.testing.assert_close(thirdparty["logits"], served, rtol=0, atol=tolerance)
    assert (thirdparty["logits"] - weight_only).abs().max() > 0  # its activations really are quantized


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_w8a8_tensors_and_lowbit_reload(family, w8a8_exports):
    from safetensors.torch import load_file

    out, result, simulated, *_ = w8a8_exports[family]
    tensors = load_file(out / "model.safetensors")
    for name, record in result.weights.items():
        assert tensors[f"{name}.weight"].dtype == torch.int8
        assert torch.equal(tensors[f"{name}.weight"].to(torch.int16) + 128, record.codes.to(torch.int16))
        assert tensors[f"{name}.weight_scale"].shape == (record.shape[0], 1)
    saved = json.loads((out / RECORD_FILE).read_text())
    assert any("symmetric" in warning for warning in saved["export"]["warnings"])
    loaded = lowbit.load(out, kernel="reference")  # bit exact (auto: the int8 kernel, within tolerance)
    assert act_bits_of(loaded.model) == 8  # lowbit evaluates it as it measured it (asymmetric simulation)
    with torch.no_grad():
        assert torch.equal(loaded.model(IDS).logits, simulated)


def test_w8a8_validates_for_every_target(w8a8_exports, tmp_path):
    result = w8a8_exports["llama"][1]
    for target in ("vllm-gpu", "vllm-cpu", "transformers"):
        out = result.save(tmp_path / target, format="compressed-tensors", target=target)
        assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "int-quantized"
