"""imatrix RTN: llama.cpp's importance-weighted range search on lowbit's grids, and the stage end to end."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import lowbit
from conftest import make_llama, save_model_dir
from lowbit.errors import LowbitError
from lowbit.formats.files import GGUF_FILE
from lowbit.methods.imatrix.search import (
    _codes_at,
    _group_error,
    _refit_offset,
    candidate_factors,
    element_weights,
    search_factors,
)
from lowbit.quantizer import quantize_weight
from lowbit.run import ExportSettings
from lowbit.scheme import parse_scheme

SCHEMES = ["w4g32", "w3g128-sym", "w2g64", "gguf:q4_0", "gguf:q5_1", "gguf:q4_k", "gguf:q6_k", "gguf:q2_k",
           "gguf:iq4_nl"]  # fmt: skip


def _weight_and_energy(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 512, generator=g) * torch.rand(1, 512, generator=g)
    energy = torch.rand(512, generator=g) ** 4 * 10  # a few columns matter much more than the rest
    return w, energy


def test_candidates_are_llama_cpp_factors_with_min_max_first():
    factors = candidate_factors(5)
    assert factors[0] == 1.0 and len(factors) == 19
    assert min(factors) == pytest.approx(16 / 16.9) and max(factors) == pytest.approx(16 / 15.1)
    assert all(f > 0 for f in candidate_factors(2, steps=150, step=0.08))  # only positive denominators


@pytest.mark.parametrize("scheme_name", SCHEMES)
def test_search_is_never_worse_than_min_max_and_usually_better(scheme_name):
    scheme = parse_scheme(scheme_name)
    w, energy = _weight_and_energy()
    hi, lo = search_factors(w, energy, scheme)
    weights = element_weights(w, energy, scheme)
    ones = torch.ones_like(hi)
    searched, minmax = _group_error(w, weights, scheme, hi, lo), _group_error(w, weights, scheme, ones, ones)
    if scheme.double_quant is None:  # groups are independent: every group at most min-max's error
        assert bool((searched <= minmax).all())
    else:  # the groups of a super-block share its scales' scale: every super-block at most min-max's error
        per = scheme.double_quant[0]
        assert bool((searched.view(24, -1, per).sum(-1) <= minmax.view(24, -1, per).sum(-1)).all())
    assert float(searched.sum()) < 0.97 * float(minmax.sum())
    record = quantize_weight(w, scheme, gamma_hi=hi, gamma_lo=lo)
    record.validate()  # on the scheme's grid (GGUF offsets and double quantization included)


@pytest.mark.parametrize("scheme_name", ["gguf:q4_1", "gguf:q5_1", "gguf:q4_k", "gguf:q2_k"])
def test_joint_scale_and_offset_refit_lowers_the_error_on_offset_grids(scheme_name):
    scheme = parse_scheme(scheme_name)
    w, energy = _weight_and_energy()
    weights = element_weights(w, energy, scheme)
    errors = []
    for refit in (False, True):
        hi, lo = search_factors(w, energy, scheme, refit=refit)
        errors.append(float(_group_error(w, weights, scheme, hi, lo).sum()))
    assert errors[1] < 0.97 * errors[0]


def test_offset_refit_is_the_weighted_least_squares_fit_of_the_codes():
    scheme = parse_scheme("gguf:q4_1")  # no double quantization: the fit is stored as it is, up to fp16
    w, energy = _weight_and_energy(2)
    weights = element_weights(w, energy, scheme)
    ones = torch.ones(24, 16)
    _, _, codes = _codes_at(w, scheme, ones, ones)
    hi, lo = _refit_offset(w, weights, scheme, ones, ones)
    x, c, wt = w.double().view(24, 16, 32), codes.double(), weights.double()
    for row, group in [(0, 0), (5, 7), (23, 15)]:
        a = torch.stack([c[row, group], torch.ones(32, dtype=torch.float64)], dim=1) * wt[row, group, :, None].sqrt()
        b = x[row, group] * wt[row, group].sqrt()
        s, m = torch.linalg.lstsq(a, b[:, None]).solution[:, 0].tolist()
        lo0, hi0 = float(x[row, group].min()), float(x[row, group].max())
        assert float(lo[row, group]) * lo0 == pytest.approx(m, rel=1e-4, abs=1e-6)
        assert float(hi[row, group]) * hi0 == pytest.approx(s * scheme.qmax + m, rel=1e-4, abs=1e-6)


def test_importance_decides_which_columns_round_well():
    scheme = parse_scheme("w3g128-sym")
    w, _ = _weight_and_energy(1)
    even = torch.tensor([100.0, 1e-3]).repeat(256)  # within every group, the even columns matter
    errors = []
    for energy in (even, even.roll(1)):
        hi, lo = search_factors(w, energy, scheme)
        err = (quantize_weight(w, scheme, gamma_hi=hi, gamma_lo=lo).dequantize() - w) ** 2
        errors.append((float(err[:, 0::2].sum()), float(err[:, 1::2].sum())))
    assert errors[0][0] < errors[1][0] and errors[1][1] < errors[0][1]


def test_columns_no_token_reached_get_the_mean_importance():
    scheme = parse_scheme("w4g32")
    w, energy = _weight_and_energy()
    energy[:100] = 0
    weights = element_weights(w, energy, scheme)
    assert bool(torch.isfinite(weights).all()) and bool((weights > 0).all())
    assert bool((element_weights(w, torch.zeros(512), scheme) > 0).all())


@pytest.fixture(scope="module")
def source(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("imatrix") / "src"
    save_model_dir(path, make_llama(), tokenizer)
    return path


def test_stage_lowers_the_block_output_error_against_rtn(source, text_file, tmp_path):
    data = {"dataset": str(text_file), "nsamples": 4, "seqlen": 32}
    runs = {r: lowbit.quantize(model=str(source), recipe=r, scheme="w3g32", **data) for r in ("rtn", "imatrix")}
    loss = {r: result.perplexity(str(text_file), seqlen=32, max_windows=4).ppl for r, result in runs.items()}
    changed = [n for n in runs["rtn"].weights if not torch.equal(runs["rtn"].weights[n].scale,
                                                                   runs["imatrix"].weights[n].scale)]  # fmt: skip
    assert changed, "the search moved no group's range"
    assert loss["imatrix"] < loss["rtn"] * 1.05  # a tiny random model: no worse than RTN, beyond noise


def test_gguf_export_decodes_to_the_records(source, text_file, tmp_path):
    result = lowbit.quantize_to(tmp_path / "out", model=str(source), recipe="imatrix", scheme="gguf:q4_1",
                                dataset=str(text_file), nsamples=4, seqlen=32,
                                export=ExportSettings(format="gguf"))  # fmt: skip
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "out" / GGUF_FILE).tensors}
    record = result.weights["model.layers.0.mlp.down_proj"]
    t = tensors["blk.0.ffn_down.weight"]
    assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type), record.dequantize().numpy())


def test_bad_options_are_refused_before_loading():
    with pytest.raises(LowbitError, match="steps"):
        lowbit.quantize(model="/nonexistent", recipe="imatrix", options={"imatrix": {"step": 0}})


def test_signround_can_start_from_the_searched_ranges(source, text_file):
    """init=imatrix starts alpha/beta at the searched factors (capped at 1): with no steps the result is that start."""
    data = {"dataset": str(text_file), "nsamples": 4, "seqlen": 32, "scheme": "w3g32"}
    imatrix_start = {"signround": {"iters": 0, "init": "imatrix"}}
    start = lowbit.quantize(model=str(source), recipe="signround", options=imatrix_start, **data)
    plain = lowbit.quantize(model=str(source), recipe="signround", options={"signround": {"iters": 0}}, **data)
    rtn = lowbit.quantize(model=str(source), recipe="rtn", **data)
    name = "model.layers.0.mlp.down_proj"
    assert torch.equal(plain.weights[name].dequantize(), rtn.weights[name].dequantize())
    assert not torch.equal(start.weights[name].scale, plain.weights[name].scale)
    imatrix_start["signround"]["iters"] = 3
    tuned = lowbit.quantize(model=str(source), recipe="signround", options=imatrix_start, **data)
    tuned.weights[name].validate()
