"""compressed-tensors pack-quantized exports, checked by compressed-tensors' and transformers' own code (formats.md §7).

Tolerance: formats.md §7 asks for logits within 1e-3 of max |logit| (fp32). The tiny models are fp32, the fp16
scales cast exactly into fp32 and (q - zp) * scale is one fp32 rounding in both decoders, so the observed
difference is 0; the spec tolerance is asserted so a loader that computes in a different order still passes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowbit
from conftest import make_llama, make_opt, save_model_dir
from lowbit.errors import LowbitError
from lowbit.models import load_model

ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors is a test extra: pip install -e '.[test]'")

# (family, scheme, ct_packing): 4-bit sym/asym, 8-bit, 2-bit, 3-bit (dense), channel strategy, sym_full, sym_omni
CASES = [
    ("llama", "w4g32", None),
    ("llama", "w4g32-sym", None),
    ("opt", "w4g32", None),
    ("llama", "w8g-1", None),
    ("llama", "w8g32-sym", None),
    ("llama", "w2g32", None),
    ("opt", "w2g32-sym_full", None),
    ("llama", "w3g32", "dense"),
    ("llama", "w4g-1-sym_omni", None),
]
IDS = torch.arange(3, 43).unsqueeze(0)


def _case_id(case) -> str:
    return f"{case[0]}-{case[1]}"


def _quantized(family: str, scheme: str, tmp: Path, tokenizer):
    source = tmp / f"src-{family}"
    if not source.exists():
        save_model_dir(source, {"llama": make_llama, "opt": make_opt}[family](), tokenizer)
    return lowbit.quantize(load_model(str(source)), recipe="rtn", scheme=scheme)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer):
    """Every case exported once; the reference logits/generation of lowbit's fake-quant model saved beside it."""
    tmp = tmp_path_factory.mktemp("ct-exports")
    built = {}
    for case in CASES:
        family, scheme, packing = case
        result = _quantized(family, scheme, tmp, tokenizer)
        out = result.save(tmp / _case_id(case), format="compressed-tensors", ct_packing=packing)
        with torch.no_grad():
            logits = result.model(IDS).logits
            generated = result.model.generate(IDS[:, :8], max_new_tokens=16, do_sample=False, pad_token_id=0)
        built[_case_id(case)] = (out, result, logits, generated)
    return built


@pytest.fixture(scope="module")
def thirdparty(exports):
    """One fresh process (no lowbit import) loads every export with transformers + compressed-tensors."""
    script = Path(__file__).with_name("thirdparty_ct_load.py")
    dirs = [str(out) for out, *_ in exports.values()]
    done = subprocess.run([sys.executable, str(script), *dirs], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {key: torch.load(out / "thirdparty.pt") for key, (out, *_) in exports.items()}


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_transformers_loads_export_and_matches_fake_quant(case, exports, thirdparty):
    _, _, logits, generated = exports[_case_id(case)]
    loaded = thirdparty[_case_id(case)]
    tolerance = 1e-3 * float(logits.abs().max())
    torch.testing.assert_close(loaded["logits"], logits, rtol=0, atol=tolerance)
    assert torch.equal(loaded["generated"], generated)
    assert loaded["generated"].shape[1] == 8 + 16


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_lowbit_loader_reads_export_bit_exact(case, exports):
    out, result, logits, generated = exports[_case_id(case)]
    loaded = lowbit.load(out, kernel="reference")  # the bit-exact path; the kernels: test_runtime_kernels.py
    packed = [m for m in loaded.model.modules() if type(m).__name__ == "PackedLinear"]
    assert len(packed) == len(result.weights)
    with torch.no_grad():
        assert torch.equal(loaded.model(IDS).logits, logits)
        assert torch.equal(
            loaded.model.generate(IDS[:, :8], max_new_tokens=16, do_sample=False, pad_token_id=0), generated
        )
    for name, record in result.weights.items():
        assert torch.equal(loaded.model.get_submodule(name).dequantize(), record.dequantize())


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_compressed_tensors_unpacks_records_bit_for_bit(case, exports):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    out, result, *_ = exports[_case_id(case)]
    tensors = load_file(out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    ct.QuantizationConfig.model_validate({k: v for k, v in config.items() if k != "lowbit"})
    assert config["lowbit"]["recipe"] == "rtn" and "lm_head" in config["ignore"]
    for name, record in result.weights.items():
        bits, half = record.scheme.bits, 2 ** (record.scheme.bits - 1)
        shape = tuple(tensors[f"{name}.weight_shape"].tolist())
        q = unpack_from_int32(tensors[f"{name}.weight_packed"], bits, torch.Size(shape))
        assert torch.equal(q.to(torch.int16) + half, record.codes.to(torch.int16))
        assert torch.equal(tensors[f"{name}.weight_scale"], record.scale.float())
        if f"{name}.weight_zero_point" in tensors:
            zp = unpack_from_int32(tensors[f"{name}.weight_zero_point"], bits, record.scale.shape, packed_dim=0)
            assert torch.equal(zp.to(torch.int32) + half, record.zero)
        else:
            assert record.scheme.kind in ("sym", "sym_full") and bool((record.zero == half).all())
        assert f"{name}.weight" not in tensors


def test_sym_full_negative_scales_survive(exports):
    _, result, *_ = exports["opt-w2g32-sym_full"]
    assert any(bool((r.scale < 0).any()) for r in result.weights.values()), "fixture should produce negative scales"


def test_library_packer_writes_identical_files(tmp_path, tokenizer):
    result = _quantized("llama", "w4g32", tmp_path, tokenizer)
    a = result.save(tmp_path / "a", format="compressed-tensors")
    b = result.save(tmp_path / "b", format="compressed-tensors", packer="compressed-tensors")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_compressed_tensors_decompressor_rejects_a_partial_group():
    """Why lowbit refuses g that does not divide k for every target: the pinned decompressor cannot hold it."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    args = QuantizationArgs(num_bits=4, symmetric=True, strategy="group", group_size=128)
    with pytest.raises(ValueError, match="divisble|divisible"):
        dequantize(torch.zeros(4, 576, dtype=torch.int8), torch.ones(4, 5), None, args)


@pytest.mark.parametrize("target", ["vllm-gpu", "transformers", "any"])
def test_partial_group_is_refused_with_the_sizes_that_work(target, tmp_path, tokenizer):
    result = _quantized("llama", "w4g48", tmp_path, tokenizer)  # 64 = 48 + 16: a partial last group
    with pytest.raises(LowbitError, match=r"group size 48 does not divide in_features 64.*16, 32, 64, or -1"):
        result.save(tmp_path / "out", format="compressed-tensors", target=target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src-llama"]  # nothing written


def test_asymmetric_3bit_refused_for_vllm_gpu(tmp_path, tokenizer):
    result = _quantized("llama", "w3g32", tmp_path, tokenizer)
    with pytest.raises(LowbitError, match="asymmetric.*only at 4 and 8 bits.*sym_full"):
        result.save(tmp_path / "out", format="compressed-tensors", target="vllm-gpu", ct_packing="dense")
    with pytest.raises(LowbitError, match="ct_packing"):
        result.save(tmp_path / "out", format="compressed-tensors")
    assert not (tmp_path / "out").exists()


def test_mismatched_qkv_refused_for_vllm(tmp_path, tokenizer):
    result = _quantized("llama", "w4g32-sym", tmp_path, tokenizer)
    other = _quantized("llama", "w8g32-sym", tmp_path, tokenizer)
    name = "model.layers.0.self_attn.k_proj"
    result.weights[name] = other.weights[name]
    result.model.get_submodule(name).weight.data = other.weights[name].dequantize()
    with pytest.raises(LowbitError, match="fused set .*self_attn mixes schemes"):
        result.save(tmp_path / "out", format="compressed-tensors", target="vllm-gpu")
    out = result.save(tmp_path / "mixed", format="compressed-tensors", target="transformers")
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len(groups) == 2 and any(name.replace(".", r"\.") in t for g in groups.values() for t in g["targets"])
    with torch.no_grad():
        assert torch.equal(lowbit.load(out, kernel="reference").model(IDS).logits, result.model(IDS).logits)


def test_unfolded_weight_is_refused(tmp_path, tokenizer):
    result = _quantized("llama", "w4g32", tmp_path, tokenizer)
    result.model.get_submodule("model.layers.1.mlp.up_proj").weight.data.mul_(1.5)  # a transform left pending
    with pytest.raises(LowbitError, match="pending"):
        result.save(tmp_path / "out", format="compressed-tensors")


def test_cli_quantize_and_eval_a_packed_export(tiny_llama_dir, text_file, tmp_path, capsys):
    from lowbit.cli import main

    out = tmp_path / "ct"
    base = ["quantize", str(tiny_llama_dir), "--out", str(out), "--format", "compressed-tensors"]
    assert main([*base, "--scheme", "w8g32-sym", "--target", "vllm-cpu"]) == 2  # the CPU kernel is 4-bit only
    assert "4-bit" in capsys.readouterr().err and not out.exists()
    assert main([*base, "--scheme", "w4g32-sym", "--target", "vllm-gpu"]) == 0
    assert main(["eval", str(out), "--ppl", str(text_file), "--eval-seqlen", "64", "--eval-windows", "2"]) == 0
    printed = capsys.readouterr().out
    assert "compressed-tensors export" in printed and "lowbit's packed CPU runtime" in printed
