"""HQQ (methods/hqq): the solver against the `hqq` library, against RTN, and the stage through every export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lowbit
from conftest import make_llama, save_model_dir
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.methods.hqq.solver import ProximalParams, hqq_quantize_groups, shrink_lp
from lowbit.methods.hqq.stage import hqq_integer, hqq_round
from lowbit.models import load_model
from lowbit.quantizer import quantize_weight
from lowbit.scheme import parse_scheme

IDS = torch.arange(3, 43).unsqueeze(0)


def _library():
    return pytest.importorskip("hqq.core.quantize", reason="the hqq library is optional: pip install hqq")


def _gaussian(shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _heavy(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Student-t (3 degrees of freedom): the heavy tails of LLM weights, where min-max ranges are outlier-driven."""
    torch.manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample(shape)


# ----------------------------------------------------------------------------------------------------------
# the solver is the library's


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_solver_gives_the_library_codes_and_zeros(bits, group_size):
    quantize = _library()
    w = _gaussian((96, 256), bits * 1000 + group_size) * 0.02
    codes, meta = quantize.Quantizer.quantize(
        w, nbits=bits, group_size=group_size, axis=1, optimize=True, round_zero=bits == 4, bitpack=False, device="cpu"
    )
    ours, scale, zero = hqq_quantize_groups(w.reshape(-1, group_size), bits, round_zero=bits == 4)
    assert torch.equal(ours, codes.float())
    assert torch.equal(zero, meta["zero"].float())
    torch.testing.assert_close(scale, meta["scale"].float(), rtol=1e-6, atol=0)


def test_keep_best_with_kappa_is_the_library_v2_solver():
    _library()
    from hqq.core.optimize import optimize_weights_proximal_v2

    from lowbit.methods.hqq.solver import minmax_init, optimize_proximal

    w = _heavy((64, 256), 1).reshape(-1, 64)
    inv_scale, zero = minmax_init(w, 7)
    params = {"lp_norm": 0.7, "beta": 10.0, "kappa": 1.01, "iters": 20, "tol": 0.0, "early_stop": True,
              "scale_gridsearch": False}  # fmt: skip
    _, ref_inv, ref_zero = optimize_weights_proximal_v2(
        w, inv_scale.clone(), zero.clone(), [0, 7], axis=1, device="cpu", dtype=torch.float32, opt_params=params
    )
    got_inv, got_zero, _ = optimize_proximal(w, inv_scale, zero, 7, ProximalParams(kappa=1.01, keep_best=True))
    assert torch.equal(got_zero, ref_zero) and torch.equal(got_inv, ref_inv)


def test_shrink_is_soft_thresholding_at_p_1_and_keeps_outliers_at_p_below_1():
    x = torch.tensor([-3.0, -0.05, 0.0, 0.05, 3.0])
    assert torch.equal(shrink_lp(x, 10.0, 1.0), torch.tensor([-2.9, 0.0, 0.0, 0.0, 2.9]))
    y = shrink_lp(x, 10.0, 0.7)
    assert y[1] == 0 and y[3] == 0 and float(y[4]) > 2.9  # small errors vanish, a large one keeps more of itself


# ----------------------------------------------------------------------------------------------------------
# HQQ is no worse than RTN, on the integer grid every export stores


def _errors(w: torch.Tensor, w_hat: torch.Tensor) -> tuple[float, float]:
    diff = w - w_hat
    return float(diff.abs().mean()), float(diff.pow(2).mean())


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("scheme_name", ["w2g64", "w3g64", "w4g64", "w4g128", "w3g-1", "w4g64-sym", "w3g32-sym_full"])
@pytest.mark.parametrize("kind", ["gaussian", "heavy"])
def test_hqq_error_is_at_most_rtn_error(scheme_name, kind, clip):
    scheme = parse_scheme(scheme_name)
    w = _gaussian((128, 512), 3) if kind == "gaussian" else _heavy((128, 512), 3)
    record, _ = hqq_integer(w, scheme, ProximalParams(), clip=clip)
    record.validate()
    hqq_l1, hqq_l2 = _errors(w, record.dequantize())
    rtn_l1, rtn_l2 = _errors(w, quantize_weight(w, scheme).dequantize())
    assert hqq_l1 <= rtn_l1 and hqq_l2 <= rtn_l2, (hqq_l1, rtn_l1, hqq_l2, rtn_l2)
    if scheme.bits <= 3:
        assert hqq_l2 < 0.97 * rtn_l2  # the gain is real at low bits, not a tie


@pytest.mark.parametrize("scheme_name", ["w2g64", "w4g64", "w3g-1", "w4g64-sym", "w3g32-sym_full"])
def test_without_clip_every_weight_stays_within_half_a_step(scheme_name):
    """The default keeps each group's extremes on the grid (as min-max RTN does); clip=True may cut them off."""
    scheme = parse_scheme(scheme_name)
    w = _heavy((64, 256), 4)
    width = scheme.group_width(256)

    def worst(record) -> float:
        step = record.scale.float().abs().repeat_interleave(width, dim=1)[:, :256]
        return float(((w - record.dequantize()).abs() / step).max())

    # half a step, up to the fp16 rounding of the scale (at most qmax + 1 steps times 2^-11), or RTN's own worst
    # (sym_full's larger extreme sits on the grid and the other one may lie one level outside it)
    bound = max(0.5 + (scheme.qmax + 1) * 2.0**-11, worst(quantize_weight(w, scheme)))
    assert worst(hqq_integer(w, scheme, ProximalParams())[0]) <= bound
    if scheme.bits <= 3:
        assert worst(hqq_integer(w, scheme, ProximalParams(), clip=True)[0]) > 1.0


def test_round_mode_stores_the_library_zero_rounded():
    """`zero="round"`: the library's fractional zero, rounded into [0, qmax], codes derived again."""
    scheme = parse_scheme("w3g64")
    w = _gaussian((32, 128), 5)
    _, scale, zero = hqq_quantize_groups(w.reshape(32, 2, 64), 3)
    record, _ = hqq_round(w, scheme, ProximalParams())
    record.validate()
    assert torch.equal(record.zero, torch.round(zero[..., 0]).clamp(0, 7).to(torch.int32))
    assert torch.equal(record.scale, scale[..., 0].half())


def test_partial_last_group_and_gguf_grids_stay_valid():
    w = _gaussian((8, 100), 6)
    for name in ("w4g32", "w2g-1"):
        hqq_integer(w, parse_scheme(name), ProximalParams())[0].validate()
    w = _gaussian((8, 512), 7)
    for name in ("gguf:q4_1-asym", "gguf:q5_1-asym", "gguf:q4_0", "gguf:q4_k-sym", "gguf:q2_k-sym"):
        hqq_integer(w, parse_scheme(name), ProximalParams())[0].validate()


# ----------------------------------------------------------------------------------------------------------
# the stage, and its output through every export


@pytest.fixture(scope="module")
def source(tmp_path_factory, tokenizer):
    return save_model_dir(tmp_path_factory.mktemp("hqq-src"), make_llama(), tokenizer)


def _hqq(source, scheme):
    return lowbit.quantize(load_model(str(source)), recipe="hqq", scheme=scheme)


def test_stage_needs_no_data_and_beats_rtn_on_every_linear(source):
    result = _hqq(source, "w3g32")
    rtn = lowbit.quantize(load_model(str(source)), recipe="rtn", scheme="w3g32")
    float_model = load_model(str(source)).model
    assert result.record["calibration"] in (None, {})
    assert len(result.weights) == 14
    for name, record in result.weights.items():
        w = float_model.get_submodule(name).weight.detach()
        assert _errors(w, record.dequantize())[0] <= _errors(w, rtn.weights[name].dequantize())[0], name


def test_fake_export_round_trips(source, tmp_path):
    result = _hqq(source, "w4g32")
    reloaded = AutoModelForCausalLM.from_pretrained(result.save(tmp_path / "fake", format="fake")).eval()
    for name, record in result.weights.items():
        assert torch.equal(reloaded.get_submodule(name).weight, record.dequantize())
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, result.model(IDS).logits)


CT_SCHEMES = ["w4g32", "w2g32", "w4g32-sym"]


@pytest.fixture(scope="module")
def ct_exports(source, tmp_path_factory):
    """Each scheme exported as compressed-tensors, then loaded by transformers + compressed-tensors in a fresh
    process that never imports lowbit (tests/thirdparty_ct_load.py)."""
    pytest.importorskip("compressed_tensors")
    tmp = tmp_path_factory.mktemp("hqq-ct")
    built = {scheme: _hqq(source, scheme) for scheme in CT_SCHEMES}
    outs = {scheme: result.save(tmp / scheme, format="compressed-tensors") for scheme, result in built.items()}
    script = Path(__file__).with_name("thirdparty_ct_load.py")
    done = subprocess.run([sys.executable, str(script), *map(str, outs.values())], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return {scheme: (built[scheme], outs[scheme], torch.load(outs[scheme] / "thirdparty.pt")) for scheme in built}


@pytest.mark.parametrize("scheme", CT_SCHEMES)
def test_compressed_tensors_export_round_trips(ct_exports, scheme):
    result, out, thirdparty = ct_exports[scheme]
    loaded = lowbit.load(out, kernel="reference")
    for name, record in result.weights.items():
        assert torch.equal(loaded.model.get_submodule(name).dequantize(), record.dequantize())
    with torch.no_grad():
        logits = result.model(IDS).logits
        assert torch.equal(loaded.model(IDS).logits, logits)
    torch.testing.assert_close(thirdparty["logits"], logits, rtol=0, atol=1e-3 * float(logits.abs().max()))


@pytest.mark.parametrize("scheme", ["w4g32", "w4g32-sym", "w8g-1"])
def test_gptq_export_round_trips(source, tmp_path, scheme):
    from test_export_gptq import reference_decode

    result = _hqq(source, scheme)
    out = result.save(tmp_path / "gptq", format="gptq")
    tensors = load_file(out / "model.safetensors")
    assert json.loads((out / "quantize_config.json").read_text())["bits"] == result.config.scheme.bits
    for name, record in result.weights.items():  # decoded by the reference GPTQ decoder, not lowbit's code
        assert torch.equal(reference_decode(tensors, name, record.scheme.bits), record.dequantize())
    with torch.no_grad():
        assert torch.equal(lowbit.load(out, kernel="reference").model(IDS).logits, result.model(IDS).logits)


@pytest.mark.parametrize(
    "scheme", ["gguf:q4_1-asym", "gguf:q5_1-asym", "gguf:q4_0", "gguf:q8_0", "gguf:q4_k-sym", "gguf:q3_k"]
)
def test_gguf_export_decodes_exactly(tmp_path, tokenizer, scheme):
    pytest.importorskip("gguf")
    from test_export_gguf import GGUF_FILE, _check_file_decodes_to_the_records, _run

    result = _run(tmp_path, tokenizer, scheme, recipe="hqq")  # a real llama.cpp file, read back by gguf-py
    _check_file_decodes_to_the_records(result, tmp_path / "out" / GGUF_FILE)


# ----------------------------------------------------------------------------------------------------------
# bad input: one error line, before any calibration or forward


@pytest.mark.parametrize(
    ("extra", "keywords"),
    [
        (["--scheme", "w4a4"], ("does not support weight-activation scheme w4a4", "w4g-1")),
        (["--scheme", "w4g32-sym", "--opt", "hqq.zero=round"], ("hqq.zero=round", "hqq.zero=integer")),
        (["--scheme", "w4g32", "--opt", "hqq.lp_norm=1.5"], ("lp_norm=1.5", "(0, 1]")),
        (["--scheme", "w4g32", "--opt", "hqq.zero=float"], ("hqq.zero='float'", "integer, round")),
    ],
)
def test_bad_input_is_one_error_line_before_calibration(source, tmp_path, monkeypatch, capsys, extra, keywords):
    def forbidden(*_args, **_kwargs):
        raise AssertionError("the run started before the input was refused")

    monkeypatch.setattr("lowbit.run.run_quantization", forbidden)
    code = main(["quantize", str(source), "--recipe", "hqq", *extra, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err
    for keyword in keywords:
        assert keyword in errors[0], errors[0]
    assert not (tmp_path / "out").exists() and "Traceback" not in err


def test_options_reach_the_solver(source):
    plain = _hqq(source, "w3g32")
    rounded = lowbit.quantize(load_model(str(source)), recipe="hqq", scheme="w3g32", options={"hqq": {"zero": "round"}})
    differs = [not torch.equal(plain.weights[n].scale, rounded.weights[n].scale) for n in plain.weights]
    assert any(differs)
    with pytest.raises(LowbitError, match="iters=0"):
        lowbit.quantize(load_model(str(source)), recipe="hqq", scheme="w3g32", options={"hqq": {"iters": 0}})
    assert np.isfinite(plain.record["timings"]["quantize_seconds"])
