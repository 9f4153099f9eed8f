"""LSI / DESV (lsi-desv.md §8): band math, exactness of the warm start, gradients only on the band, optimizer groups,
export equals the trained block, training lowers the loss, bad options."""

from __future__ import annotations

import logging

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.config import build_config
from lowbit.engine import call_block
from lowbit.engine.block_train import EpochSettings, block_forward, make_optimizer, train_epochs
from lowbit.errors import LowbitError
from lowbit.methods.desv.band import (
    BandedIncrement,
    BandIndex,
    band_mask,
    band_matrix,
    banded_sum_delta,
    delta_weight,
    live_count,
)
from lowbit.methods.desv.stage import DESV_LR, _Trainable
from lowbit.models import load_model
from test_omniquant import make_llama, make_opt, omni_block, randomise_let


@pytest.mark.parametrize(("r", "n"), [(7, 0), (7, 2), (16, 5), (5, 4)])
def test_live_parameter_count_and_diagonal_lsi(r, n):
    assert int(band_mask(r, n).sum()) == live_count(r, n)
    index = BandIndex.build(r, n)
    p = torch.randn(2 * n + 1, r)
    b = band_matrix(p, index)
    i, j = torch.meshgrid(torch.arange(r), torch.arange(r), indexing="ij")
    assert torch.all(b[(i - j).abs() > n] == 0)
    for d in range(-n, n + 1):
        for row in range(max(0, -d), min(r, r - d)):
            assert b[row, row + d] == p[d + n, row]
    if n == 0:
        assert torch.equal(b, torch.diag(p[0]))
    assert int(band_mask(r, max(n, 1), inclusive=False).sum()) == live_count(r, max(n, 1) - 1)


@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (16, 16)], ids=["wide", "tall", "square"])
def test_zero_band_gives_w0_bit_for_bit_and_paths_agree(shape):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    band = BandedIncrement.from_weight(weight, n=3)
    r = min(shape)
    assert band.u.shape == (shape[0], r) and band.vh.shape == (r, shape[1])
    assert torch.equal(weight + band.delta(), weight)
    with torch.no_grad():
        band.p.copy_(torch.randn(band.p.shape) * band.index.mask)
    dense = band.delta()
    for order in ("left", "right"):
        summed = banded_sum_delta(band.u, band.p.detach(), band.vh, band.index, order)
        assert torch.allclose(dense, summed, rtol=1e-5, atol=1e-6 * float(dense.abs().max()))
    b = band_matrix(band.p.detach(), band.index)
    assert torch.allclose(delta_weight(band.u, b, band.vh), band.u @ b @ band.vh, atol=1e-5)


def test_gradients_are_exactly_zero_off_the_band():
    band = BandedIncrement.from_weight(torch.randn(10, 14), n=2)
    (band.delta() * torch.randn(10, 14)).sum().backward()
    grad = band.p.grad
    assert torch.all(grad[~band.index.mask] == 0)
    assert torch.all(grad[band.index.mask] != 0)


def test_band_wider_than_r_is_clipped_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        band = BandedIncrement.from_weight(torch.randn(6, 9), n=100)
    assert band.index.n == 5 and "clipped" in caplog.text
    assert band.live_parameters() == 36  # the whole 6 x 6 B


def _desv(model, **overrides):
    omni, hidden, kwargs = omni_block(model, **overrides)
    bands = {name: BandedIncrement.from_weight(omni.base[f"{name}.weight"], 4) for name in omni.linears}
    return omni, _Trainable(omni, bands, DESV_LR, False), hidden, kwargs


@pytest.mark.parametrize("make", [make_llama, make_opt], ids=["llama", "opt"])
def test_warm_start_reproduces_omniquant_block_output_bit_for_bit(make):
    model = make()
    omni_plain, hidden, kwargs = omni_block(model)
    randomise_let(omni_plain, seed=5)
    state = omni_plain.state_dict()
    plain = omni_plain.block_params()
    omni, trainable, _, _ = _desv(model)
    omni.load_state_dict(state)
    with_band = trainable.block_params()
    assert plain.keys() == with_band.keys()
    assert all(torch.equal(plain[k], with_band[k]) for k in plain)
    forward = block_forward(omni.block, {key: key for key in plain}, kwargs)
    assert torch.equal(forward(plain, hidden), forward(with_band, hidden))


def test_optimizer_has_three_groups_without_weight_decay():
    _, trainable, _, _ = _desv(make_opt())
    optimizer = make_optimizer(trainable, EpochSettings(epochs=1))
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert set(groups) == {"desv", "let", "lwc"}
    assert groups["desv"]["lr"] == 1.5e-4 and groups["let"]["lr"] == 5e-3 and groups["lwc"]["lr"] == 1e-2
    assert all(group["weight_decay"] == 0 for group in optimizer.param_groups)


def test_training_lowers_loss_keeps_mask_and_export_equals_trained_block():
    omni, trainable, hidden, kwargs = _desv(make_llama(), let=False)
    trainable.lr = 1e-3
    targets = call_block(omni.block, hidden, kwargs).detach()
    forward = block_forward(omni.block, {key: key for key in trainable.block_params()}, kwargs)
    record = train_epochs(
        trainable, forward, hidden, targets, None, EpochSettings(epochs=2), device=torch.device("cpu")
    )
    assert record.epoch_losses[1] < record.epoch_losses[0]
    for band in trainable.bands.values():
        assert torch.all(band.p[~band.index.mask] == 0) and band.p.abs().sum() > 0
    with torch.no_grad():
        trained = forward(trainable.block_params(), hidden)
    records = omni.fold()
    with torch.no_grad():
        for name, linear in omni.linears.items():
            assert int(records[name].codes.max()) <= records[name].scheme.qmax
            linear.weight.copy_(records[name].dequantize())
        assert torch.equal(call_block(omni.block, hidden, kwargs), trained)


def quantize_tiny(model_dir, text_file, recipe="desv", **options):
    """lowbit.quantize on a tiny model, 4 x 16 tokens, w3g32; desv options default to 1 epoch, n = 4."""
    stage_options = {"epochs": 1, **({"n": 4} if recipe == "desv" else {}), **options}
    return lowbit.quantize(
        load_model(str(model_dir)),
        recipe=recipe,
        scheme="w3g32",
        dataset=str(text_file),
        nsamples=4,
        seqlen=16,
        options={recipe: stage_options, "engine": {"progress": False}},
    )


def test_stage_end_to_end_warm_start_from_saved_omniquant(tiny_llama_dir, text_file, tmp_path):
    omni = quantize_tiny(tiny_llama_dir, text_file, recipe="omniquant")
    saved = omni.save(tmp_path / "oq")
    result = quantize_tiny(tiny_llama_dir, text_file, warm_start=str(saved), epochs=0)
    for name, record in omni.weights.items():  # zero DESV epochs from the saved state = the OmniQuant run
        assert torch.equal(record.codes, result.weights[name].codes), name
    trained = quantize_tiny(tiny_llama_dir, text_file, warm_start=str(saved))
    block = trained.record["stages"]["desv"][0]["desv"]
    assert block["warm_start"] == "saved" and block["svd_seconds"] >= 0 and block["live_parameters"] > 0
    out = trained.save(tmp_path / "desv")
    from lowbit.export import read_artifacts

    names = read_artifacts(out)
    assert names and all(key.startswith("omniquant.") for key in names)  # no U, Vh or band in the export


def test_lsi_and_desv_only_presets_and_bad_options(tiny_llama_dir, text_file, tmp_path, capsys):
    assert build_config(recipe="lsi").stages[0].options.n == 0
    assert build_config(recipe="desv-only").stages[0].options.desv_only
    only = quantize_tiny(tiny_llama_dir, text_file, desv_only=True)
    assert only.record["stages"]["desv"][0]["desv"]["desv_only"]
    with pytest.raises(LowbitError, match="desv.n must be >= 0"):
        build_config(recipe="desv", options={"desv": {"n": -1}})
    out = tmp_path / "never"
    code = main(
        [
            "quantize",
            str(tiny_llama_dir),
            "--recipe",
            "desv",
            "--opt",
            f"desv.warm_start={tmp_path}/none",
            "--out",
            str(out),
        ]
    )
    assert code == 2 and not out.exists()
    assert "warm start" in capsys.readouterr().err


def test_lsi_fast_path_equals_the_dense_diagonal():
    band = BandedIncrement.from_weight(torch.randn(9, 13), n=0)
    with torch.no_grad():
        band.p.copy_(torch.randn(band.p.shape))
    dense = delta_weight(band.u, torch.diag(band.p.detach()[0]), band.vh)
    assert torch.allclose(band.delta(), dense, atol=1e-6)
