"""Qwen3-MoE on tiny random models (2 blocks, hidden 64, 4 experts, top-2, fp32): fused experts presented as
per-expert linears, exact capture/replay, RTN and GPTQ, per-expert routing counts, the RTN fallback of an expert no
token reaches, every stage running or refusing clearly, and the exports with the hub's per-expert names."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

import lowbit
from conftest import save_model_dir
from families import RECIPES, assert_capture_replays
from lowbit.arch import arch_for
from lowbit.arch.moe import LinearExperts
from lowbit.engine import capture_block_inputs
from lowbit.errors import LowbitError
from lowbit.methods import STAGES
from lowbit.models import load_model

CPU = torch.device("cpu")
IDS = torch.randint(3, 320, (3, 24), generator=torch.Generator().manual_seed(0))
EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")


def make_moe(num_experts: int = 4, seed: int = 0, **extra) -> torch.nn.Module:
    """A fresh tiny fp32 Qwen3-MoE with randomised norm weights, in eval mode (fused experts, as loaded)."""
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=num_experts, num_experts_per_tok=2,
        max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=1, tie_word_embeddings=False,
        **extra,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


def starve_expert(model: torch.nn.Module, expert: int) -> None:
    """Make `expert` unreachable in every block: with 5 experts and top-2, router rows (v, -v, u, -u, 0) give two
    of the first four experts a positive logit for any input, so the zero row never makes the top 2."""
    with torch.no_grad():
        for block in arch_for(model).blocks(model):
            weight = block.mlp.gate.weight
            v, u = weight[0].clone(), weight[2].clone()
            rows = [v, -v, u, -u]
            others = [index for index in range(weight.shape[0]) if index != expert]
            for index, row in zip(others, rows, strict=True):
                weight[index] = row
            weight[expert] = 0


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, tokenizer) -> Path:
    return save_model_dir(tmp_path_factory.mktemp("qwen3-moe"), make_moe(), tokenizer)


@pytest.fixture(scope="module")
def starved_dir(tmp_path_factory, tokenizer) -> Path:
    model = make_moe(num_experts=5)
    starve_expert(model, 4)
    return save_model_dir(tmp_path_factory.mktemp("qwen3-moe-starved"), model, tokenizer)


def run(directory, recipe, text_file, scheme="w4g32", options=None):
    return lowbit.quantize(
        load_model(str(directory)), recipe=recipe, scheme=scheme, dataset=str(text_file), nsamples=4, seqlen=16,
        seed=0, options={"engine": {"progress": False, "batch_size": 2}, **(options or {})},
    )  # fmt: skip


# --- the spec: fused experts as per-expert linears -----------------------------------------------------------------


def test_experts_become_exact_per_expert_linears_with_hub_names():
    model = make_moe()
    with torch.no_grad():
        before = model(IDS).logits
    fused = model.model.layers[0].mlp.experts
    gate_up, down = fused.gate_up_proj.detach().clone(), fused.down_proj.detach().clone()
    arch = arch_for(model)
    assert arch.family == "qwen3-moe"
    linears = arch.linears(arch.blocks(model)[0])  # presents the experts as linears on demand
    assert isinstance(model.model.layers[0].mlp.experts, LinearExperts)
    assert "mlp.gate" not in linears  # the router stays float
    assert list(linears)[4:12] == [f"mlp.experts.{e}.{n}" for e in range(4) for n in EXPERT_NAMES[:2]]
    assert torch.equal(linears["mlp.experts.2.gate_proj"].weight, gate_up[2, :32])
    assert torch.equal(linears["mlp.experts.2.up_proj"].weight, gate_up[2, 32:])
    assert torch.equal(linears["mlp.experts.3.down_proj"].weight, down[3])
    arch.prepare(model)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=1e-5)


def test_dense_layers_of_a_sparse_model_keep_the_dense_layout():
    model = make_moe(mlp_only_layers=[1])
    arch = arch_for(model)
    dense, sparse = arch.blocks(model)[1], arch.blocks(model)[0]
    assert arch.linear_names_for(dense) == arch.linear_names
    assert len(arch.linear_names_for(sparse)) == 4 + 4 * 3
    # GQA drops v->o in both; the sparse block has no norm->gate/up or up->down group (its FFN is the experts)
    assert len(arch.groups_for(dense)) == 3 and len(arch.groups_for(sparse)) == 1


def test_capture_replays_every_block_exactly():
    model = make_moe()
    arch = arch_for(model)
    arch.prepare(model)
    captured = capture_block_inputs(model, arch, IDS, batch_size=2, device=CPU)
    assert_capture_replays(model, arch, captured, IDS)


# --- RTN, GPTQ, routing counts, the fallback -----------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["rtn", "gptq"])
def test_rtn_and_gptq_quantize_every_expert(recipe, moe_dir, text_file):
    result = run(moe_dir, recipe, text_file)
    assert len(result.weights) == 2 * (4 + 4 * 3)
    assert "model.layers.1.mlp.experts.3.down_proj" in result.weights
    assert not any(name.endswith("mlp.gate") for name in result.weights)
    for name, record in result.weights.items():
        assert torch.equal(result.model.get_submodule(name).weight, record.dequantize())
    with torch.no_grad():
        assert bool(torch.isfinite(result.model(IDS).logits).all())


def test_routing_counts_are_recorded_and_sum_to_tokens_times_top_k(moe_dir, text_file):
    result = run(moe_dir, "gptq", text_file)
    blocks = result.record["stages"]["gptq"]
    assert len(blocks) == 2
    for block in blocks:
        routing = block["routing"]
        assert routing["tokens"] == 4 * 16 and routing["top_k"] == 2 and routing["experts"] == 4
        assert sum(routing["routed"]) == routing["tokens"] * 2
    json.dumps(result.record)  # the counts travel in the run record


def test_an_expert_no_token_reaches_falls_back_to_rtn(starved_dir, text_file, caplog):
    with caplog.at_level(logging.WARNING):
        result = run(starved_dir, "gptq", text_file)
    for index, block in enumerate(result.record["stages"]["gptq"]):
        assert block["routing"]["unrouted"] == [4] and block["routing"]["routed"][4] == 0
        for name in EXPERT_NAMES:
            assert block["gptq"][f"mlp.experts.4.{name}"] == {"fallback": "rtn", "tokens": 0}
            assert "fallback" not in block["gptq"][f"mlp.experts.0.{name}"]
        record = result.weights[f"model.layers.{index}.mlp.experts.4.gate_proj"]
        assert record.codes.any()  # RTN of the float weight, not the all-zero weight an empty Hessian would give
    assert "rounded with RTN instead" in caplog.text and "received none of the" in caplog.text
    rtn = run(starved_dir, "rtn", text_file)
    name = "model.layers.0.mlp.experts.4.down_proj"
    assert torch.equal(result.weights[name].codes, rtn.weights[name].codes)


# --- every stage runs or refuses clearly --------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_stage_runs_or_refuses_clearly(recipe, starved_dir, text_file):
    """On the model with an unreachable expert: a stage that runs must also cope with linears that see nothing."""
    arch = arch_for(make_moe())
    reasons = [STAGES[name].refuses(arch) for name in recipe.split("+")]
    if any(reasons):
        assert all("mixture-of-experts" in r for r in reasons if r)
        with pytest.raises(LowbitError, match="does not support the qwen3-moe family"):
            run(starved_dir, recipe, text_file, options=RECIPES[recipe])
        return
    result = run(starved_dir, recipe, text_file, options=RECIPES[recipe])
    assert len(result.weights) == 2 * (4 + 5 * 3)
    with torch.no_grad():
        assert bool(torch.isfinite(result.model(IDS).logits).all())


def test_support_matrix_has_the_family():
    from lowbit.support import matrix_markdown, support_matrix

    rows = {row["family"]: row for row in support_matrix()}
    row = rows["qwen3-moe"]
    assert row["model_types"] == ["qwen3_moe"] and "experts" in row["traits"]
    assert row["stages"]["rtn"] == row["stages"]["gptq"] == "yes"
    assert "mixture-of-experts" in row["stages"]["awq"]
    assert "qwen3-moe" in matrix_markdown()


# --- exports: the hub's per-expert names, reloads with matching logits -----------------------------------------------


@pytest.fixture(scope="module")
def exported(moe_dir, text_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-exports")
    result = run(moe_dir, "rtn", text_file, scheme="w4g32-sym")
    with torch.no_grad():
        logits = result.model(IDS[:1]).logits
    outs = {fmt: result.save(root / fmt, format=fmt) for fmt in ("fake", "compressed-tensors", "gptq")}
    return result, logits, outs


def _keys(directory: Path) -> set[str]:
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_exports_use_the_hub_per_expert_names(exported):
    result, _, outs = exported
    suffixes = {"fake": ("weight",), "compressed-tensors": ("weight_packed", "weight_scale", "weight_shape"),
                "gptq": ("qweight", "qzeros", "scales", "g_idx")}  # fmt: skip
    for fmt, directory in outs.items():
        keys = _keys(directory)
        for layer in range(2):
            prefix = f"model.layers.{layer}.mlp"
            assert f"{prefix}.gate.weight" in keys  # the router, float
            for expert in range(4):
                for name in EXPERT_NAMES:
                    assert all(f"{prefix}.experts.{expert}.{name}.{s}" in keys for s in suffixes[fmt]), (fmt, name)
        assert not any("gate_up_proj" in key or key.endswith("experts.down_proj") for key in keys)
    qc = json.loads((outs["compressed-tensors"] / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"] and qc["ignore"] == ["lm_head"]


def test_fake_export_reloads_in_transformers_with_matching_logits(exported):
    _, logits, outs = exported
    fake = AutoModelForCausalLM.from_pretrained(outs["fake"]).eval()
    assert not isinstance(fake.model.layers[0].mlp.experts, LinearExperts)  # transformers' own fused experts
    with torch.no_grad():
        torch.testing.assert_close(fake(IDS[:1]).logits, logits, rtol=0, atol=1e-5 * float(logits.abs().max()))


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_packed_exports_reload_in_lowbit_with_matching_logits(fmt, exported):
    _, logits, outs = exported
    model = lowbit.load(outs[fmt], kernel="reference").model  # the bit-exact path (kernels: test_runtime_kernels)
    assert isinstance(model.model.layers[1].mlp.experts, LinearExperts)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS[:1]).logits, logits, rtol=0, atol=1e-4 * float(logits.abs().max()))


def test_compressed_tensors_export_loads_in_transformers(exported):
    """transformers decompresses the per-expert tensors into its fused experts (symmetric experts only)."""
    pytest.importorskip("compressed_tensors")
    result, _, outs = exported
    script = Path(__file__).with_name("thirdparty_ct_load.py")
    directory = outs["compressed-tensors"]
    done = subprocess.run([sys.executable, str(script), str(directory)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ids = torch.arange(3, 43).unsqueeze(0)  # what the third-party script feeds
    loaded = torch.load(directory / "thirdparty.pt")["logits"]
    with torch.no_grad():
        expected = result.model(ids).logits
    torch.testing.assert_close(loaded, expected, rtol=0, atol=1e-3 * float(expected.abs().max()))


def test_asymmetric_experts_refuse_compressed_tensors_and_auto_falls_back(moe_dir, text_file, tmp_path):
    result = run(moe_dir, "rtn", text_file, scheme="w4g32")  # asymmetric: zero points
    with pytest.raises(LowbitError, match="MoE experts must be symmetric"):
        result.save(tmp_path / "ct", format="compressed-tensors")
    assert not (tmp_path / "ct").exists()
    out = result.save(tmp_path / "auto")
    assert result.record["format"] == "gptq"
    record = json.loads((out / "lowbit_record.json").read_text())
    assert "MoE experts must be symmetric" in record["format_choice"]["rejected"]["compressed-tensors"]
    with torch.no_grad():
        expected = result.model(IDS[:1]).logits
        loaded = lowbit.load(out, kernel="reference").model(IDS[:1]).logits
    torch.testing.assert_close(loaded, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))
