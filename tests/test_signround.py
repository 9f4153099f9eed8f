"""SignRound on tiny models: optimiser pieces, the block loop, the engine chain, presets and export round trips."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import lowbit
from conftest import make_llama
from lowbit.arch import arch_for
from lowbit.config import build_config
from lowbit.engine import EngineOptions, call_block, capture_block_inputs, run_block_stages
from lowbit.engine.block_train import IndexSampler, block_forward, block_mse
from lowbit.errors import LowbitError
from lowbit.methods.signround.stage import SignRound, SignRoundOptions
from lowbit.methods.signround.tune import (
    TunedLinear,
    TuneSettings,
    linear_schedule,
    sign_step,
    tune_block,
)
from lowbit.models import load_model
from lowbit.quantizer import quantize_weight
from lowbit.scheme import parse_scheme

W2 = parse_scheme("w2g32")


def calibration_ids(n=8, length=16, vocab=320, seed=0):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def run_signround(model, scheme=W2, seed=0, **options):
    stage = SignRound(SignRoundOptions(**{"iters": 8, "batch_size": 4, **options}), scheme)
    records, metrics = (
        (
            found := run_block_stages(
                model, arch_for(model), [stage], scheme, calibration_ids(), EngineOptions(progress=False), seed=seed
            )
        ).records,
        found.metrics,
    )
    return records, metrics


def test_identity_parameters_give_rtn_codes_bit_for_bit():
    w = torch.randn(16, 80)  # 80 = 2.5 groups of 32: partial last group
    linear = torch.nn.Linear(80, 16)
    linear.weight.data = w
    layer = TunedLinear.wrap("x", linear, W2)
    rtn = quantize_weight(w, W2)
    record = layer.record()
    assert torch.equal(record.codes, rtn.codes) and torch.equal(record.scale, rtn.scale)
    assert torch.equal(layer.qdq(), record.dequantize())


def test_sign_step_moves_by_lr_times_sign_and_keeps_zero_gradients():
    p = torch.tensor([0.1, 0.2, 0.3], requires_grad=True)
    p.grad = torch.tensor([2.0, 0.0, -1e-9])
    sign_step([p], 0.01)
    torch.testing.assert_close(p.detach(), torch.tensor([0.09, 0.2, 0.31]), rtol=0, atol=1e-7)
    assert p.grad is None


@pytest.mark.parametrize("iters", [1, 7, 200])
def test_linear_schedule_sums_to_the_step_budget(iters):
    lr = 1.0 / iters
    schedule = linear_schedule(lr, iters)
    assert schedule[0] == lr and len(schedule) == iters
    assert abs(sum(schedule) - lr * (iters + 1) / 2) < 1e-9


def test_sampler_sweeps_without_replacement_and_reshuffles():
    sampler = IndexSampler(torch.arange(10), 4, torch.Generator().manual_seed(0))
    first, second = sampler.next(), sampler.next()
    assert len(set(first.tolist()) | set(second.tolist())) == 8  # no repeats within a sweep
    third = sampler.next()  # only 2 left: reshuffle
    assert len(set(third.tolist())) == 4


def test_masked_last_position_does_not_change_the_gradient():
    out = torch.randn(2, 5, 3, requires_grad=True)
    target = torch.randn(2, 5, 3)
    other = target.clone()
    other[:, -1] += 10.0
    grads = []
    for tgt in (target, other):
        out.grad = None
        block_mse(out, tgt, mask_last_token=True).backward()
        grads.append(out.grad.clone())
    assert torch.equal(grads[0], grads[1])
    assert torch.all(grads[0][:, -1] == 0)


def _tiny_block_setup(seed=0):
    model = lowbit_tiny()
    arch = arch_for(model)
    block = arch.blocks(model)[0]
    block.requires_grad_(False)
    hidden = torch.randn(8, 16, 64, generator=torch.Generator().manual_seed(seed))
    position_ids = torch.arange(16)[None]
    kwargs = {"position_embeddings": model.model.rotary_emb(hidden, position_ids)}
    with torch.no_grad():
        targets = call_block(block, hidden, kwargs)
    layers = [TunedLinear.wrap(name, linear, W2) for name, linear in arch.linears(block).items()]
    forward = block_forward(block, {layer.name: f"{layer.name}.weight" for layer in layers}, kwargs)
    return layers, forward, hidden, targets


def lowbit_tiny():
    return make_llama()


def test_best_restore_returns_the_parameters_of_the_lowest_measured_loss():
    layers, forward, hidden, targets = _tiny_block_setup()
    seen = []

    def recording_forward(weights, x):
        seen.append([p.detach().clone() for layer in layers for p in layer.parameters()])
        return forward(weights, x)

    settings = TuneSettings(iters=12, lr=0.05, minmax_lr=0.05, batch_size=4, micro_batch_size=2)
    result = tune_block(
        layers, recording_forward, hidden, targets, torch.arange(8), None, settings, torch.Generator().manual_seed(0)
    )
    per_iter = seen[::2]  # two micro-batches per iteration, parameters unchanged between them
    best = min(range(len(result.losses)), key=result.losses.__getitem__)
    assert result.best_iter == best and result.best_loss == result.losses[best]
    restored = [p for layer in layers for p in layer.parameters()]
    for got, want in zip(restored, per_iter[best], strict=True):
        assert torch.equal(got.detach(), want)


def test_holdout_selection_restores_the_best_holdout_parameters():
    layers, forward, hidden, targets = _tiny_block_setup()
    settings = TuneSettings(
        iters=10, lr=0.1, minmax_lr=0.1, batch_size=3, micro_batch_size=3, best_select="holdout", holdout_every=3
    )
    result = tune_block(
        layers, forward, hidden, targets, torch.arange(6), torch.tensor([6, 7]), settings, torch.Generator()
    )
    assert set(result.holdout_losses) == {0, 3, 6, 9, 10}
    assert result.best_loss == min(result.holdout_losses.values())
    with torch.no_grad():
        weights = {layer.name: layer.qdq() for layer in layers}
        again = float(block_mse(forward(weights, hidden[6:8]), targets[6:8], False))
    assert again == pytest.approx(result.best_loss, rel=1e-5)


def test_tuned_block_loss_is_below_rtn_and_v_stays_in_range(tiny_model):
    reference = copy.deepcopy(tiny_model)
    arch = arch_for(tiny_model)
    ids = calibration_ids()
    captured = capture_block_inputs(reference, arch, ids, batch_size=8, device=torch.device("cpu"))
    block = arch.blocks(reference)[0]
    with torch.no_grad():
        target = call_block(block, captured.hidden, captured.kwargs)
        rtn_block = copy.deepcopy(block)
        for linear in arch.linears(rtn_block).values():
            linear.weight.copy_(quantize_weight(linear.weight, W2).dequantize())
        rtn_loss = float(block_mse(call_block(rtn_block, captured.hidden, captured.kwargs), target, False))
    run_signround(tiny_model, iters=20, clamp_v=True)
    with torch.no_grad():
        tuned = call_block(arch.blocks(tiny_model)[0], captured.hidden, captured.kwargs)
    assert float(block_mse(tuned, target, False)) < rtn_loss


def test_v_is_clamped_and_bounded_by_the_step_budget():
    layers, forward, hidden, targets = _tiny_block_setup()
    for clamp in (True, False):
        for layer in layers:
            with torch.no_grad():
                layer.v.zero_()
        settings = TuneSettings(iters=10, lr=0.2, minmax_lr=0.1, batch_size=4, micro_batch_size=4, clamp_v=clamp)
        tune_block(layers, forward, hidden, targets, torch.arange(8), None, settings, torch.Generator())
        bound = 0.5 if clamp else sum(linear_schedule(0.2, 10))
        for layer in layers:
            assert float(layer.v.detach().abs().max()) <= bound + 1e-6
            assert float(layer.alpha.clamp(0, 1).min()) >= 0.0


def test_same_seed_gives_identical_codes_and_invariant_holds(tiny_model):
    twin = copy.deepcopy(tiny_model)
    first, metrics = run_signround(tiny_model)
    second, _ = run_signround(twin)
    assert metrics[0]["iters_run"] == 8 and metrics[0]["best_loss"] <= metrics[0]["loss_first"]
    params = dict(tiny_model.named_parameters())
    for name, record in first.items():
        assert torch.equal(record.codes, second[name].codes)
        assert torch.equal(params[f"{name}.weight"], record.dequantize())


def test_stage_option_controls_the_input_chain(tiny_model):
    seen = []

    class Recording(SignRound):
        def process_block(self, ctx):
            seen.append((ctx.inputs.clone(), ctx.fp_inputs.clone()))
            super().process_block(ctx)

    for quantized_input in (True, False):
        seen.clear()
        model = copy.deepcopy(tiny_model)
        stage = Recording(SignRoundOptions(iters=2, batch_size=4, quantized_input=quantized_input), W2)
        run_block_stages(
            model,
            arch_for(model),
            [stage],
            W2,
            calibration_ids(),
            EngineOptions(progress=False, quantized_input=not quantized_input, replay="fp32"),
            seed=0,
        )
        assert torch.equal(seen[1][0], seen[1][1]) is (not quantized_input)
        if quantized_input:  # Q-chain: block 1 sees quantized block 0 applied to block 0's Q-chain input
            arch = arch_for(model)
            block0 = arch.blocks(model)[0]
            captured = capture_block_inputs(model, arch, calibration_ids(), batch_size=8, device=torch.device("cpu"))
            with torch.no_grad():
                expected = call_block(block0, seen[0][0], captured.kwargs)
            torch.testing.assert_close(seen[1][0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", ["w4g32", "w4g64", "w4g-1", "w3g32-sym", "w2g64-sym_full", "w8g128"])
def test_schemes_round_trip_through_the_quantized_model(tiny_llama_dir, tmp_path, text_file, scheme):
    result = lowbit.quantize(
        load_model(str(tiny_llama_dir)),
        recipe="signround",
        scheme=scheme,
        dataset=str(text_file),
        nsamples=4,
        seqlen=16,
        options={"signround": {"iters": 2, "batch_size": 2}, "engine": {"progress": False}},
    )
    assert len(result.weights) == 14
    out = result.save(tmp_path / "out", format="fake")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    for name, record in result.weights.items():
        record.validate()
        assert torch.equal(reloaded.get_submodule(name).weight, record.dequantize())


def test_presets_expand_and_explicit_values_win(tmp_path):
    fast = build_config(recipe="signround-fast")
    assert fast.recipe == "signround" and (fast.nsamples, fast.seqlen) == (128, 2048)
    assert fast.stages[0].options.iters == 200
    paper = build_config(recipe="signround-paper")
    assert (paper.nsamples, paper.seqlen, paper.stages[0].options.lr) == (512, 2048, 5e-3)
    light = build_config(recipe="signround-light", nsamples=16, options={"signround": {"iters": 3}})
    assert (light.nsamples, light.seqlen, light.stages[0].options.iters, light.stages[0].options.lr) == (
        16,
        2048,
        3,
        5e-3,
    )
    path = tmp_path / "r.yaml"
    path.write_text("recipe: signround-best\nseqlen: 256\n")
    best = build_config(recipe_file=path)
    assert (best.seqlen, best.nsamples, best.stages[0].options.iters) == (256, 512, 1000)
    assert best.stages[0].options.low_bit_lr_boost
    assert SignRound(best.stages[0].options, parse_scheme("w2g128")).settings().lr == 2 / 1000
    assert SignRound(best.stages[0].options, parse_scheme("w4g128")).settings().lr == 1 / 1000
    plain = build_config(recipe="signround", options={"signround": {"iters": "50"}})
    assert plain.stages[0].options.iters == 50 and plain.nsamples == 128


def test_bad_options_are_named():
    with pytest.raises(LowbitError, match="signround.iters"):
        SignRound(SignRoundOptions(iters=-1), W2)
    with pytest.raises(LowbitError, match="holdout"):
        run_signround(lowbit_tiny(), best_select="holdout", holdout=8)


def test_cli_preset_with_opt_overrides(tiny_llama_dir, text_file, tmp_path):
    from lowbit.cli import main
    from lowbit.formats.files import RECORD_FILE

    out = tmp_path / "out"
    code = main(
        [
            "quantize", str(tiny_llama_dir), "--recipe", "signround-light", "--scheme", "w2g128",
            "--dataset", str(text_file), "--nsamples", "4", "--seqlen", "16", "--opt", "signround.iters=2",
            "--opt", "signround.batch_size=2", "--opt", "engine.progress=false", "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    import json

    record = json.loads((out / RECORD_FILE).read_text())
    options = record["config"]["options"]["signround"]
    assert (options["iters"], options["lr"], record["config"]["nsamples"]) == (2, 5e-3, 4)
    assert record["stages"]["signround"][0]["iters_run"] == 2


@pytest.mark.parametrize("scheme", ["w2g128", "w3g32", "w4g-1", "w4g64"])
def test_fused_qdq_equals_fake_quant_bit_for_bit_with_matching_gradients(scheme):
    sch = parse_scheme(scheme)
    linear = torch.nn.Linear(200, 24)  # 200 columns: a partial last group at g32/g64/g128
    fast, generic = (TunedLinear.wrap("x", linear, sch, fast=flag) for flag in (True, False))
    assert fast.grouped is not None and generic.grouped is None
    for layer in (fast, generic):
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            layer.v.uniform_(-0.6, 0.6, generator=gen)
            layer.alpha.uniform_(0.4, 1.1, generator=gen)
            layer.beta.uniform_(0.4, 1.1, generator=gen)
    q_fast, q_generic = fast.qdq(), generic.qdq()
    assert torch.equal(q_fast, q_generic)
    assert torch.equal(q_fast, fast.record().dequantize())
    upstream = torch.randn(q_fast.shape, generator=torch.Generator().manual_seed(2))
    (q_fast * upstream).sum().backward()
    (q_generic * upstream).sum().backward()
    assert torch.equal(fast.v.grad, generic.v.grad)
    for got, want in ((fast.alpha.grad, generic.alpha.grad), (fast.beta.grad, generic.beta.grad)):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
        assert float((got == 0).float().mean()) == float((want == 0).float().mean())  # same clamped entries
