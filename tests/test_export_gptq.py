"""GPTQ v1 exports checked by a reference decoder written here from formats.md §3 (not lowbit's code).

gptqmodel 7.7.0 (the current release) requires torch >= 2.14.1 and would pull CUDA wheels on this CPU machine, so
transformers + optimum + gptqmodel cannot load these exports here; the decoder below is the third-party check:
W[o, i] = scales[g_idx[i], o] * (code[i, o] - (stored_zero[g_idx[i], o] + 1)), 32/b fields per int32 word, row
32/b*r + j of qweight's word r at bits b*j.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lowbit
from conftest import make_llama, make_opt, save_model_dir
from lowbit.errors import LowbitError
from lowbit.models import load_model

IDS = torch.arange(3, 43).unsqueeze(0)
CASES = [("llama", "w4g32-sym"), ("opt", "w4g32-sym_full"), ("llama", "w8g32-sym"), ("llama", "w2g32-sym"),
         ("llama", "w4g-1-sym_omni"), ("opt", "w8g-1")]  # fmt: skip


def _fields(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Split each int32 word into its 32/b unsigned fields, lowest bits first; new last dim."""
    wide = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    return (wide.unsqueeze(-1) >> shifts) & (2**bits - 1)


def reference_decode(tensors: dict, prefix: str, bits: int) -> torch.Tensor:
    qweight, qzeros = tensors[f"{prefix}.qweight"], tensors[f"{prefix}.qzeros"]
    scales, g_idx = tensors[f"{prefix}.scales"].float(), tensors[f"{prefix}.g_idx"].long()
    codes = _fields(qweight, bits).permute(0, 2, 1).reshape(-1, qweight.shape[1])  # [k, m]
    zeros = _fields(qzeros, bits).reshape(qzeros.shape[0], -1) + 1  # [G, m]
    return (scales[g_idx] * (codes - zeros[g_idx])).T  # [m, k]


def _quantized(family, scheme, tmp, tokenizer):
    source = tmp / f"src-{family}"
    if not source.exists():
        save_model_dir(source, {"llama": make_llama, "opt": make_opt}[family](), tokenizer)
    return lowbit.quantize(load_model(str(source)), recipe="rtn", scheme=scheme)


@pytest.mark.parametrize("family,scheme", CASES)
def test_gptq_export_decodes_to_the_fake_quant_weights(family, scheme, tmp_path, tokenizer):
    result = _quantized(family, scheme, tmp_path, tokenizer)
    out = result.save(tmp_path / "gptq", format="gptq")
    tensors = load_file(out / "model.safetensors")
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc == json.loads((out / "config.json").read_text())["quantization_config"]
    bits = result.config.scheme.bits
    assert (qc["bits"], qc["checkpoint_format"], qc["desc_act"]) == (bits, "gptq", False)
    assert qc["sym"] == (result.config.scheme.kind in ("sym", "sym_full"))
    for name, record in result.weights.items():
        assert tensors[f"{name}.scales"].dtype == torch.float16
        assert torch.equal(reference_decode(tensors, name, bits), record.dequantize())
        if record.scheme.kind == "sym" and bits == 4:
            assert bool((tensors[f"{name}.qzeros"] == 0x77777777).all())

    # The reference-decoded model reproduces the fake-quant logits and greedy generation.
    reference = _quantized(family, scheme, tmp_path, tokenizer).model  # same weights, then overwritten
    for name in result.weights:
        module: nn.Linear = reference.get_submodule(name)
        module.weight.data = reference_decode(tensors, name, bits)
    loaded = lowbit.load(out, kernel="reference").model  # bit exact; the kernels: test_runtime_kernels.py
    with torch.no_grad():
        expected = result.model(IDS).logits
        torch.testing.assert_close(reference(IDS).logits, expected, rtol=0, atol=1e-3 * float(expected.abs().max()))
        assert torch.equal(loaded(IDS).logits, expected)
        gen = [m.generate(IDS[:, :8], max_new_tokens=16, do_sample=False, pad_token_id=0) for m in (reference, loaded)]
        assert torch.equal(gen[0], gen[1])
        assert torch.equal(
            gen[1], result.model.generate(IDS[:, :8], max_new_tokens=16, do_sample=False, pad_token_id=0)
        )


def test_gptq_refuses_an_asymmetric_zero_of_zero(tmp_path, tokenizer):
    model = make_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.abs_()  # all weights >= 0: the asymmetric zero is 0
    source = save_model_dir(tmp_path / "src", model, tokenizer)
    result = lowbit.quantize(load_model(str(source)), recipe="rtn", scheme="w4g32")
    assert int(result.weights["model.layers.0.mlp.up_proj"].zero.min()) == 0
    with pytest.raises(LowbitError, match="zero of 0.*compressed-tensors"):
        result.save(tmp_path / "out", format="gptq")
    assert not (tmp_path / "out").exists()
    result.save(tmp_path / "ct", format="compressed-tensors")  # the suggested format holds it


def test_gptq_refuses_3bit_and_bf16_scales(tmp_path, tokenizer):
    result = _quantized("llama", "w3g32-sym", tmp_path, tokenizer)
    with pytest.raises(LowbitError, match="GPTQ v1 cannot hold 3-bit"):
        result.save(tmp_path / "out", format="gptq")
    bf16 = lowbit.quantize(
        load_model(str(tmp_path / "src-llama")), recipe="rtn", scheme={"bits": 4, "group_size": 32, "kind": "sym",
                                                                        "scale_dtype": "bfloat16"})  # fmt: skip
    with pytest.raises(LowbitError, match="fp16 scales"):
        bf16.save(tmp_path / "out", format="gptq")


def test_gptq_asymmetric_with_nonzero_zeros_round_trips(tmp_path, tokenizer):
    result = _quantized("llama", "w4g32", tmp_path, tokenizer)
    if min(int(r.zero.min()) for r in result.weights.values()) < 1:
        pytest.skip("random init produced a zero of 0")
    out = result.save(tmp_path / "gptq", format="gptq")
    tensors = load_file(out / "model.safetensors")
    for name, record in result.weights.items():
        assert torch.equal(reference_decode(tensors, name, 4), record.dequantize())


def test_act_order_groups_go_to_gptq_not_compressed_tensors(tmp_path, tokenizer):
    """compressed-tensors 0.20 removed actorder "group": a g_idx run is refused there; auto writes GPTQ desc_act."""
    source = save_model_dir(tmp_path / "src", make_llama(), tokenizer)
    options = {"gptq": {"act_order": True}}
    result = lowbit.quantize(load_model(str(source)), recipe="gptq", scheme="w4g32-sym", dataset="builtin",
                             nsamples=4, seqlen=32, options=options)  # fmt: skip
    assert any(record.g_idx is not None for record in result.weights.values())
    with pytest.raises(LowbitError, match="static_groups=true"):
        result.save(tmp_path / "ct", format="compressed-tensors")
    assert not (tmp_path / "ct").exists()
    out = result.save(tmp_path / "auto")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["desc_act"]) == ("gptq", True)
    options = {"gptq": {"act_order": True, "static_groups": True}}
    static = lowbit.quantize(load_model(str(source)), recipe="gptq", scheme="w4g32-sym", dataset="builtin",
                             nsamples=4, seqlen=32, options=options)  # fmt: skip
    ct = json.loads((static.save(tmp_path / "static", format="compressed-tensors") / "config.json").read_text())
    assert ct["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] is None


def test_cli_refuses_act_order_compressed_tensors_before_calibration(tmp_path, tokenizer, monkeypatch, capsys):
    from lowbit.cli import main

    source = save_model_dir(tmp_path / "src", make_llama(), tokenizer)

    def forbidden(*_args, **_kwargs):
        raise AssertionError("the run started before the export was refused")

    monkeypatch.setattr("lowbit.run.run_quantization", forbidden)
    args = ["quantize", str(source), "--recipe", "gptq", "--opt", "gptq.act_order=true", "--scheme", "w4g32-sym",
            "--dataset", "builtin", "--format", "compressed-tensors", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 2
    assert "gptq.static_groups=true" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
