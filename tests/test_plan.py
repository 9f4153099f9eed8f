"""The memory planner: shapes from config.json (parameter counts exact against transformers), the estimate's
behaviour (grows with samples, not with depth when streamed), the resident/stream decision, the refusal, the
accelerator estimate, and the small readers of the machine's memory. No forward pass: only tiny models built."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lowbit import synthetic
from lowbit.config import build_config
from lowbit.errors import LowbitError
from lowbit.export import compressed_tensors as ct
from lowbit.planner.estimate import RUNTIME_BASELINE, _export_bytes, _record_bytes
from lowbit.planner.plan import (
    GIB,
    MIB,
    MemoryPhases,
    available_memory,
    cgroup_available,
    estimate,
    peak_rss_phases,
    plan_run,
)
from lowbit.planner.shape import LinearShape, ModelShape
from lowbit.quantizer import quantize_weight
from lowbit.scheme import parse_scheme

TINY = {"hidden_size": 64, "intermediate_size": 96, "num_layers": 3, "num_heads": 4, "vocab_size": 320}
LLAMA_7B = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "torch_dtype": "float16",
}  # fmt: skip
TINY_LLAMA = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4}


def tiny_config(family: str, tie: bool = False, **overrides):
    kv = TINY["num_heads"] if family == "opt" else 2
    return synthetic.synthetic_config(
        family, num_kv_heads=kv, dtype=torch.bfloat16, tie_word_embeddings=tie, overrides=overrides, **TINY
    )


def count(config) -> tuple[int, list[int]]:
    """Parameters of the model transformers builds from `config` (tied once), and per decoder block."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    layers = model.model.decoder.layers if config.model_type == "opt" else model.model.layers
    return sum(p.numel() for p in model.parameters()), [sum(p.numel() for p in b.parameters()) for b in layers]


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("family", synthetic.FAMILIES)
def test_parameter_counts_match_transformers(family, tie):
    config = tiny_config(family, tie)
    total, blocks = count(config)
    shape = ModelShape.from_config(config)
    assert shape.params == total
    assert shape.block_params == blocks
    # the same from config.json's dict, where fields at their default are left out (use_diff)
    raw = {**config.to_diff_dict(), "model_type": config.model_type}
    assert ModelShape.from_config(raw).params == total


@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("llama", {"attention_bias": True, "mlp_bias": True}),
        ("qwen3", {"attention_bias": True}),
        ("gemma2", {"head_dim": 32}),
        ("opt", {"word_embed_proj_dim": 32}),
        ("opt", {"do_layer_norm_before": False, "enable_bias": False}),
        ("qwen3_moe", {"mlp_only_layers": [0], "decoder_sparse_step": 1, "num_experts": 4}),
        ("qwen3_moe", {"decoder_sparse_step": 2}),
    ],
)
def test_parameter_counts_of_variants(family, overrides):
    config = tiny_config(family, **overrides)
    total, blocks = count(config)
    shape = ModelShape.from_config(config)
    assert (shape.params, shape.block_params) == (total, blocks)


def test_shape_reads_a_synthetic_checkpoint_directory(tmp_path):
    path = synthetic.write_synthetic_checkpoint(
        tmp_path / "ckpt", family="llama", hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
        num_kv_heads=2, vocab_size=320, dtype=torch.float16,
    )  # fmt: skip
    shape = ModelShape.from_config(path)
    assert shape.dtype == "float16" and shape.num_layers == 2 and shape.hidden_size == 32
    assert shape.checkpoint_bytes == (path / "model.safetensors").stat().st_size - _header_bytes(path)
    assert ModelShape.from_config(path / "config.json") == shape
    plan = plan_run(path, build_config(recipe="gptq", nsamples=4, seqlen=16), stream_option="off", available=64 * GIB)
    assert plan.fits and not plan.stream


def _header_bytes(path) -> int:
    data = (path / "model.safetensors").read_bytes()
    return 8 + int.from_bytes(data[:8], "little")


def test_shape_refuses_unknown_families_and_sizes_large_ones():
    with pytest.raises(LowbitError, match="does not know model type"):
        ModelShape.from_config({"model_type": "mamba"})
    shape = ModelShape.from_config(LLAMA_7B)
    assert shape.params == 6_738_415_616  # Llama-2-7B
    assert shape.dtype == "float16" and shape.checkpoint_bytes == 2 * shape.params
    assert ModelShape.from_config(AutoConfig.for_model("llama", **TINY_LLAMA)).dtype == "bfloat16"


def test_record_bytes_match_the_quantizer():
    for scheme in ("w4g32", "w3g-1", "w2g64-sym"):
        config = build_config(recipe="rtn", scheme=scheme)
        record = quantize_weight(torch.randn(96, 80), parse_scheme(scheme))
        actual = sum(t.numel() * t.element_size() for t in record.state_dict().values())
        assert _record_bytes(LinearShape("x", 96, 80), config) == actual


@pytest.mark.parametrize("scheme", ["w4g128", "w3g128", "w2g64", "w8g-1", "w4g128-sym"])
def test_export_bytes_match_the_compressed_tensors_writer(scheme):
    config = build_config(recipe="rtn", scheme=scheme)
    for m, k in ((96, 256), (100, 130)):
        tensors = ct.layer_tensors(quantize_weight(torch.randn(m, k), parse_scheme(scheme)), torch.float32, "dense")
        actual = sum(t.numel() * t.element_size() for t in tensors.values())
        assert _export_bytes(LinearShape("x", m, k), config, "compressed-tensors") == actual


def _llama(layers: int, hidden: int = 512) -> dict:
    return {"model_type": "llama", "hidden_size": hidden, "intermediate_size": 1376, "num_hidden_layers": layers,
            "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 8192}  # fmt: skip


def test_estimate_grows_with_nsamples_and_seqlen():
    shape = ModelShape.from_config(_llama(8))
    for recipe in ("gptq", "signround", "awq+gptq", "omniquant"):
        small = estimate(shape, build_config(recipe=recipe, nsamples=16, seqlen=256), stream=True).estimate
        more = estimate(shape, build_config(recipe=recipe, nsamples=64, seqlen=256), stream=True).estimate
        longer = estimate(shape, build_config(recipe=recipe, nsamples=16, seqlen=1024), stream=True).estimate
        assert small < more and small < longer, recipe
    rtn = [estimate(shape, build_config(recipe="rtn", nsamples=n), stream=False).estimate for n in (16, 512)]
    assert rtn[0] == rtn[1]  # no calibration data, no chains


def test_exact_gptq_hessians_are_counted_in_fp64():
    shape = ModelShape.from_config(_llama(8))

    def hessian_terms(exact: bool) -> int:
        config = build_config(recipe="gptq", nsamples=4, seqlen=64, options={"gptq": {"exact_hessian": exact}})
        phases = estimate(shape, config, stream=True).phases.values()
        return sum(terms.get("gptq_hessians_and_solve", 0) for terms in phases)

    k = _llama(8)["intermediate_size"]  # the largest subset: down_proj alone, k = intermediate size
    assert hessian_terms(True) - hessian_terms(False) == k * k * 4  # the fp64 sum holds 4 more bytes per entry


@pytest.mark.parametrize("recipe", ["rtn", "gptq", "signround"])
def test_streamed_estimate_does_not_grow_with_depth(recipe):
    config = build_config(recipe=recipe, nsamples=16, seqlen=64)
    streamed = [estimate(ModelShape.from_config(_llama(n)), config, stream=True).estimate for n in (8, 96)]
    resident = [estimate(ModelShape.from_config(_llama(n)), config, stream=False).estimate for n in (8, 96)]
    assert streamed[0] == streamed[1]
    assert resident[1] - resident[0] > 0.8e9  # the control: today's resident engine holds every block


def test_decision_flips_with_available_memory():
    config = build_config(recipe="gptq", nsamples=32, seqlen=256)
    shape = ModelShape.from_config(_llama(32, hidden=1024))
    resident = estimate(shape, config, stream=False)
    plenty = plan_run(shape, config, stream_option="auto", available=4 * resident.required)
    assert not plenty.stream and plenty.fits and plenty.decision.startswith("auto")
    tight = plan_run(shape, config, stream_option="auto", available=int(resident.required / 0.85) - 1)
    assert tight.stream and tight.fits
    forced = plan_run(shape, config, stream_option="off", available=int(resident.required * 0.9))
    assert not forced.stream and not forced.fits
    assert "engine.stream=on" in forced.refusal()


def test_refusal_names_estimate_available_and_fixes():
    ram = {"engine": {"offload": "ram"}}  # engine.offload=auto would put the chains on disk and fit
    config = build_config(recipe="gptq", nsamples=256, seqlen=2048, options=ram)
    shape = ModelShape.from_config(_llama(16, hidden=2048))
    streamed = estimate(shape, config, stream=True)
    available = int(streamed.required * 0.7)
    plan = plan_run(shape, config, stream_option="auto", available=available)
    assert plan.stream and not plan.fits
    message = plan.refusal()
    assert "\n" not in message
    assert f"{streamed.required / GIB:.1f} GiB" in message and f"{available / GIB:.1f} GiB" in message
    assert "--nsamples" in message and "--seqlen" in message
    with pytest.raises(LowbitError, match="it fits with"):
        plan.check()
    # the suggested sample count really fits
    suggested = int(message.split("--nsamples ")[1].split(";")[0].split()[0])
    fixed = plan_run(shape, build_config(recipe="gptq", nsamples=suggested, seqlen=2048, options=ram),
                     stream_option="on", available=available)  # fmt: skip
    assert fixed.fits


def test_model_scope_stage_cannot_stream():
    config = build_config(recipe="teq+rtn", nsamples=8, seqlen=64)
    shape = ModelShape.from_config(_llama(8))
    plan = plan_run(shape, config, stream_option="on", available=64 * GIB)
    assert not plan.fits and "model scope" in plan.refusal()
    resident = plan_run(shape, config, stream_option="auto", available=64 * GIB)
    assert not resident.stream and resident.fits and "teq_stage" in resident.phases
    small = plan_run(shape, config, stream_option="auto", available=resident.required // 2)
    assert not small.stream and not small.fits
    assert "no single option" in small.refusal() and "cannot stream" in small.refusal()


def test_streaming_combined_with_fewer_samples():
    """Where neither streaming nor fewer samples fits alone, the fix is both (chains kept in RAM: on disk,
    streaming alone would fit)."""
    config = build_config(recipe="gptq", nsamples=256, seqlen=2048, options={"engine": {"offload": "ram"}})
    shape = ModelShape.from_config(_llama(96, hidden=2048))
    few = build_config(recipe="gptq", nsamples=16, seqlen=2048)
    available = int(estimate(shape, few, stream=True).required * 1.05)
    assert available < estimate(shape, config, stream=True).required
    assert available < estimate(shape, build_config(recipe="gptq", nsamples=1, seqlen=2048), stream=False).required
    plan = plan_run(shape, config, stream_option="off", available=available)
    assert "engine.stream=on with --nsamples" in plan.refusal()


def test_cuda_estimate():
    config = build_config(recipe="signround", nsamples=32, seqlen=512, options={"engine": {"device": "cuda"}})
    shape = ModelShape.from_config(_llama(8, hidden=1024))
    plan = plan_run(shape, config, stream_option="on", available=64 * GIB, gpu_available=80 * GIB)
    assert plan.gpu_terms["block_weights"] == shape.largest_block.params * 4
    assert "signround_chains_on_device" in plan.gpu_terms and plan.fits
    cpu = plan_run(shape, build_config(recipe="signround", nsamples=32, seqlen=512), available=64 * GIB)
    assert not cpu.gpu_terms and plan.baseline > cpu.baseline  # the CUDA runtime's host memory
    small = plan_run(shape, config, stream_option="on", available=64 * GIB, gpu_available=plan.gpu_estimate // 2)
    assert not small.fits
    assert "accelerator memory" in small.refusal() and "engine.device=cpu" in small.refusal()


def test_plan_record_and_table():
    plan = plan_run(_llama(8), build_config(recipe="gptq", nsamples=16, seqlen=128), available=8 * GIB,
                    evaluate=True)  # fmt: skip
    record = json.loads(json.dumps(plan.to_dict()))
    assert record["mode"] == "resident" and record["fits"] and record["available_mib"] == 8 * 1024
    assert record["estimate_mib"] == round(plan.estimate / 2**20, 1)
    assert set(record["phases_mib"]) >= {"load", "capture", "block_loop", "export", "evaluation"}
    table = plan.describe()
    assert "block_loop" in table and "runtime_baseline" in table and "fits" in table.splitlines()[-1]


def test_available_memory_and_cgroups(tmp_path):
    import psutil

    assert 0 < available_memory() <= psutil.virtual_memory().total
    v2 = tmp_path / "v2"
    (v2 / "job").mkdir(parents=True)
    (v2 / "job" / "memory.max").write_text("4294967296\n")
    (v2 / "job" / "memory.current").write_text("1073741824\n")
    (v2 / "job" / "memory.stat").write_text("anon 100\ninactive_file 536870912\n")
    (tmp_path / "cgroup2").write_text("0::/job\n")
    assert cgroup_available(tmp_path / "cgroup2", v2) == 4 * GIB - GIB + GIB // 2
    v1 = tmp_path / "v1"
    (v1 / "memory" / "a").mkdir(parents=True)
    (v1 / "memory" / "a" / "memory.limit_in_bytes").write_text(str(2 * GIB))
    (v1 / "memory" / "a" / "memory.usage_in_bytes").write_text(str(GIB))
    (tmp_path / "cgroup1").write_text("5:cpu:/\n4:memory:/a\n")
    assert cgroup_available(tmp_path / "cgroup1", v1) == GIB
    (v1 / "memory" / "a" / "memory.limit_in_bytes").write_text(str(2**63 - 4096))  # unlimited
    assert cgroup_available(tmp_path / "cgroup1", v1) is None


def test_peak_rss_phases():
    status = peak_rss_phases()
    assert status["peak_rss_mib"] >= status["rss_mib"] > 0
    assert {"rss_anon_mib", "rss_file_mib"} <= set(status)
    phases = MemoryPhases()
    phases.mark("start")
    assert set(phases.to_dict()) == {"start"}


def test_runtime_baseline_covers_a_fresh_import():
    """RUNTIME_BASELINE is a run's fixed cost (measured: benchmarks/plan_calibrate.py); importing lowbit in a fresh
    process is most of it, so it must stay below the constant and not far below it."""
    code = "import lowbit.run, psutil; print(psutil.Process().memory_info().rss)"
    rss = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0.6 * RUNTIME_BASELINE < rss < RUNTIME_BASELINE


CALIBRATION = Path(__file__).parent.parent / "benchmarks" / "results" / "plan_calibration.json"


def test_estimates_stay_within_25_percent_of_the_measured_runs():
    """The resident estimates against the peak RSS measured by benchmarks/plan_calibrate.py (real `lowbit quantize`
    runs on synthetic checkpoints): a change to a term or a constant must keep every run within 25%."""
    runs = json.loads(CALIBRATION.read_text())["runs"]
    assert len(runs) >= 10
    for run in runs:
        spec = dict(run["model_config"])
        family, dtype = spec.pop("family"), getattr(torch, spec.pop("dtype"))
        model = synthetic.synthetic_config(family, dtype=dtype, tie_word_embeddings=False, **spec)
        options: dict[str, dict[str, str]] = {}
        for opt in run["options"]:
            key, value = opt.split("=", 1)
            options.setdefault(key.split(".")[0], {})[key.split(".", 1)[1]] = value
        config = build_config(recipe=run["recipe"], nsamples=run["nsamples"], seqlen=run["seqlen"], options=options)
        plan = plan_run(model, config, stream_option="off", evaluate=run["eval"], available=64 * GIB)
        assert 0.75 <= plan.estimate / MIB / run["measured_peak_mib"] <= 1.25, run["run"]
