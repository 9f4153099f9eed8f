"""OmniQuant (LWC + LET) on tiny Llama-like and OPT models: exactness of LET, LWC vs RTN, fold = trained block,
warm start, the non-finite guard, the training loop, presets and the CLI (omniquant.md §10)."""

from __future__ import annotations

import math

import pytest
import torch

import lowbit
from conftest import make_llama, make_opt
from lowbit.arch import arch_for
from lowbit.cli import main
from lowbit.config import build_config
from lowbit.engine import call_block, capture_block_inputs
from lowbit.engine.block_train import EpochSettings, block_forward, train_epochs
from lowbit.errors import LowbitError
from lowbit.methods.omniquant.block import BlockSettings, OmniQuantBlock
from lowbit.methods.omniquant.let import activation_stats, let_groups
from lowbit.methods.omniquant.lwc import LearnableClip
from lowbit.methods.omniquant.stage import OmniQuantOptions, resolve_recipe
from lowbit.models import LoadedModel, load_model
from lowbit.quantizer import fake_quant
from lowbit.scheme import QuantScheme, parse_scheme

W2 = parse_scheme("w2g32")


def settings(**overrides) -> BlockSettings:
    values = dict(
        lwc=True, let=True, shift=True, alpha=0.5, let_lr=5e-3, lwc_lr=1e-2, qk_tying="rotary", reference_quirk=False
    )
    return BlockSettings(**{**values, **overrides})


def first_block(model, n: int = 4, seqlen: int = 16):
    """(arch, block 0, its captured inputs, kwargs) for random token windows."""
    arch = arch_for(model)
    ids = torch.randint(0, 300, (n, seqlen), generator=torch.Generator().manual_seed(1))
    captured = capture_block_inputs(model, arch, ids, batch_size=n, device=torch.device("cpu"))
    return arch, arch.blocks(model)[0], captured.hidden, captured.kwargs


def omni_block(model, scheme=W2, **overrides):
    arch, block, hidden, kwargs = first_block(model)
    keys = [group.key_linear for group in let_groups(arch, block)]
    stats = activation_stats(block, keys, hidden, kwargs, torch.device("cpu"))
    return OmniQuantBlock(block, arch, scheme, settings(**overrides), stats), hidden, kwargs


def randomise_let(omni: OmniQuantBlock, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in omni.let_parameters():
            param.copy_(0.5 + torch.rand(param.shape, generator=generator))
        for pair in omni.pairs:
            if pair.shift is not None:
                pair.shift.copy_(0.1 * torch.randn(pair.shift.shape, generator=generator))


# --- LWC ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["w2g32", "w3g-1", "w4g48", "w8g128"])
def test_lwc_with_saturated_factors_is_rtn_without_forced_zero(scheme):
    parsed = parse_scheme(scheme)
    weight = torch.randn(24, 96, generator=torch.Generator().manual_seed(0))
    clip = LearnableClip(24, 96, parsed)
    with torch.no_grad():
        clip.upper.fill_(30.0)
        clip.lower.fill_(30.0)
    rtn = fake_quant(weight, QuantScheme(parsed.bits, parsed.group_size, "asym", include_zero=False))
    assert torch.equal(clip.fake(weight), rtn)
    assert torch.equal(clip.record(weight).dequantize(), clip.fake(weight))


def test_lwc_gradient_reaches_factors_and_sym_omni_path():
    weight = torch.randn(8, 64)
    for kind in ("asym", "sym_omni"):
        clip = LearnableClip(8, 64, QuantScheme(3, 32, kind))
        clip.fake(weight).pow(2).sum().backward()
        assert clip.upper.grad is not None and clip.upper.grad.abs().sum() > 0
        record = clip.record(weight)
        record.validate()
        assert torch.equal(record.dequantize(), clip.fake(weight).detach())


# --- LET exactness ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make", [make_opt, make_llama, lambda: make_llama(kv_heads=2)], ids=["opt", "llama", "llama-gqa"]
)
def test_let_is_an_exact_equivalence_with_quantization_off(make):
    model = make()
    omni, hidden, kwargs = omni_block(model)
    randomise_let(omni)
    block = omni.block
    reference = call_block(block, hidden, kwargs)
    params = omni.transformed()
    forward = block_forward(block, {key: key for key in params}, kwargs)
    out = forward(params, hidden)
    assert torch.allclose(out, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
    names = {pair.group.prev for pair in omni.pairs}
    gqa = (
        model.config.num_key_value_heads != model.config.num_attention_heads
        if hasattr(model.config, "num_key_value_heads")
        else False
    )
    assert ("self_attn.v_proj" in names) != gqa  # v->o skipped under GQA
    assert omni.qk is not None
    if make is make_opt:
        assert all(pair.shift is not None for pair in omni.pairs)


def test_untied_qk_scales_break_rope_equivalence():
    model = make_llama()
    omni, hidden, kwargs = omni_block(model, qk_tying="none")
    randomise_let(omni)
    with torch.no_grad():
        for pair in omni.pairs:
            pair.scale.fill_(1.0)
    reference = call_block(omni.block, hidden, kwargs)
    params = omni.transformed()
    out = block_forward(omni.block, {key: key for key in params}, kwargs)(params, hidden)
    assert not torch.allclose(out, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))


def test_llama_has_no_shifts_and_opt_reference_quirk_divides_v_columns():
    omni, _, _ = omni_block(make_llama())
    assert all(pair.shift is None for pair in omni.pairs)  # RMSNorm and bias-free linears: no shift possible
    omni, _, _ = omni_block(make_opt(), reference_quirk=True)
    randomise_let(omni)
    pair = next(p for p in omni.pairs if p.group.prev == "self_attn.v_proj")
    original = omni.base["self_attn.v_proj.weight"]
    params = omni.transformed()
    assert torch.equal(params["self_attn.v_proj.weight"], original / pair.scale)  # columns divided, qkv scale lost


def test_scale_floor_is_applied_before_use():
    omni, _, _ = omni_block(make_opt())
    with torch.no_grad():
        omni.pairs[0].scale[0] = 1e-4
        omni.pairs[0].scale[1] = -1e-3
    omni.transformed()
    assert omni.pairs[0].scale[0].item() == pytest.approx(1e-2)
    assert omni.pairs[0].scale[1].item() == pytest.approx(-1e-2)


# --- training, fold, state ---------------------------------------------------------------------------------


def _train(omni, hidden, kwargs, epochs, targets, lr_scale=1.0):
    forward = block_forward(omni.block, {key: key for key in omni.block_params()}, kwargs)
    for group in (omni.settings,):
        assert group.lwc_lr > 0
    return train_epochs(
        omni, forward, hidden, targets, None, EpochSettings(epochs=epochs), device=torch.device("cpu")
    ), forward


@pytest.mark.parametrize("make", [make_llama, make_opt], ids=["llama", "opt"])
def test_fold_reproduces_the_trained_fake_quant_block_bit_for_bit(make):
    omni, hidden, kwargs = omni_block(make())
    targets = call_block(omni.block, hidden, kwargs).detach()
    _, forward = _train(omni, hidden, kwargs, 2, targets)
    with torch.no_grad():
        trained = forward(omni.block_params(), hidden)
    records = omni.fold()
    with torch.no_grad():
        for name, linear in omni.linears.items():
            linear.weight.copy_(records[name].dequantize())
        folded = call_block(omni.block, hidden, kwargs)
    assert torch.equal(trained, folded)
    for record in records.values():
        record.validate()


def test_two_epochs_lower_the_block_loss_at_w2():
    omni, hidden, kwargs = omni_block(make_llama(), let=False)
    targets = call_block(omni.block, hidden, kwargs).detach()
    omni.settings = settings(let=False, lwc_lr=5e-2)
    record, _ = _train(omni, hidden, kwargs, 2, targets)
    assert record.epoch_losses[1] < record.epoch_losses[0]
    assert record.steps == 2 * hidden.shape[0]


def test_optimizer_groups_and_state_round_trip():
    omni, hidden, kwargs = omni_block(make_opt())
    groups = {group["name"]: group for group in omni.parameter_groups()}
    assert groups["let"]["lr"] == 5e-3 and groups["lwc"]["lr"] == 1e-2
    randomise_let(omni, seed=3)
    state = omni.state_dict()
    twin, _, _ = omni_block(make_opt())
    twin.load_state_dict(state)
    assert all(
        torch.equal(a, b) for a, b in zip(omni.block_params().values(), twin.block_params().values(), strict=True)
    )
    with pytest.raises(LowbitError, match="does not match"):
        twin.load_state_dict({k: v for k, v in state.items() if not k.startswith("lwc.")})


class _Exploding:
    """A trainable whose loss becomes NaN after two steps: the guard must restore the last finite value."""

    def __init__(self):
        self.value = torch.nn.Parameter(torch.ones(3))
        self.calls = 0

    def parameter_groups(self):
        return [{"params": [self.value], "lr": 0.1, "name": "x"}]

    def block_params(self):
        self.calls += 1
        return {"x": self.value * (math.nan if self.calls > 2 else 1.0)}

    def after_step(self):
        pass


def test_nonfinite_loss_restores_last_finite_parameters():
    trainable = _Exploding()
    inputs, targets = torch.zeros(5, 3), torch.zeros(5, 3)
    seen = []

    def forward(params, x):
        seen.append(trainable.value.detach().clone())
        return params["x"] + x

    record = train_epochs(
        trainable, forward, inputs, targets, None, EpochSettings(epochs=1), device=torch.device("cpu")
    )
    assert record.nonfinite_at == 2 and record.steps == 2
    assert torch.equal(trainable.value.detach(), seen[-2])  # the parameters that gave the last finite loss


# --- recipe resolution, stage, CLI --------------------------------------------------------------------------


def test_recipe_table_resolution():
    llama, opt = arch_for(make_llama()), arch_for(make_opt())
    cpu = torch.device("cpu")
    w2 = resolve_recipe(OmniQuantOptions(), llama, parse_scheme("w2g128"), cpu)
    assert (w2.epochs, w2.aug_loss, w2.block.let, w2.autocast) == (40, True, False, "off")
    w4a4 = resolve_recipe(OmniQuantOptions(), opt, parse_scheme("w4a4"), cpu)
    assert (w4a4.epochs, w4a4.block.let, w4a4.block.shift, w4a4.block.alpha) == (20, True, True, 0.75)
    w3 = resolve_recipe(OmniQuantOptions(), opt, parse_scheme("w3g-1"), cpu)
    assert (w3.epochs, w3.block.let, w3.block.shift) == (20, True, False)
    w6a6 = resolve_recipe(OmniQuantOptions(), llama, parse_scheme("w6a6"), cpu)
    assert (w6a6.block.let, w6a6.block.shift, w6a6.aug_loss) == (True, False, False)


def test_presets_and_bad_options():
    config = build_config(recipe="omniquant-cpu")
    assert config.stages[0].name == "omniquant" and config.stages[0].options.epochs == 2 and config.nsamples == 16
    with pytest.raises(LowbitError, match="epochs"):
        lowbit.quantize(None, recipe="omniquant", options={"omniquant": {"epochs": -1}})
    with pytest.raises(LowbitError, match="sym_full"):
        lowbit.quantize(None, recipe="omniquant", scheme="w4g128-sym_full")


def quantize_tiny(model, text_file, scheme="w3g32", **options):
    return lowbit.quantize(
        LoadedModel(model, None, "tiny", None) if not isinstance(model, LoadedModel) else model,
        recipe="omniquant",
        scheme=scheme,
        dataset=str(text_file),
        nsamples=4,
        seqlen=16,
        options={"omniquant": {"epochs": 1, **options}, "engine": {"progress": False}},
    )


def test_warm_start_from_an_export_reproduces_the_run(tiny_llama_dir, text_file, tmp_path):
    first = quantize_tiny(load_model(str(tiny_llama_dir)), text_file, let=True)
    out = first.save(tmp_path / "oq")
    again = quantize_tiny(load_model(str(tiny_llama_dir)), text_file, let=True, epochs=0, warm_start=str(out))
    for name, record in first.weights.items():
        assert torch.equal(record.codes, again.weights[name].codes), name
        assert torch.equal(record.scale, again.weights[name].scale), name
    stages = again.record["stages"]["omniquant"]
    assert all(block["omniquant"]["warm_start"] for block in stages)
    with pytest.raises(LowbitError, match="no lowbit_artifacts"):
        quantize_tiny(load_model(str(tiny_llama_dir)), text_file, warm_start=str(tmp_path))


def test_cli_end_to_end_and_bad_epochs(tiny_opt_dir, text_file, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(
        [
            "quantize",
            str(tiny_opt_dir),
            "--recipe",
            "omniquant",
            "--scheme",
            "w3g32",
            "--dataset",
            str(text_file),
            "--nsamples",
            "4",
            "--seqlen",
            "16",
            "--opt",
            "omniquant.epochs=1",
            "--out",
            str(out),
        ]
    )
    assert code == 0 and (out / "lowbit_artifacts.safetensors").exists()
    bad = tmp_path / "bad"
    code = main(
        ["quantize", str(tiny_opt_dir), "--recipe", "omniquant", "--opt", "omniquant.epochs=-1", "--out", str(bad)]
    )
    assert code == 2 and not bad.exists()
    assert "omniquant.epochs must be >= 0" in capsys.readouterr().err


def test_let_transform_before_another_quantizer(tiny_opt_dir, text_file):
    loaded = load_model(str(tiny_opt_dir))
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = loaded.model(input_ids=ids).logits
    from lowbit.arch import arch_for as _arch
    from lowbit.config import build_config as _build
    from lowbit.data import load_calibration
    from lowbit.engine.pipeline import run_stages

    config = _build(recipe="let+rtn", scheme="w8g32", options={"let": {"epochs": 1}})
    let_stage = config.stages[0].stage_class(config.stages[0].options, config.scheme)
    calib = load_calibration(loaded.tokenizer, str(text_file), nsamples=4, seqlen=16, seed=0).input_ids
    records, metrics = (
        (
            found := run_stages(loaded.model, _arch(loaded.model), [let_stage], config.scheme, calib, config.engine, 0)
        ).records,
        found.metrics,
    )
    assert not records and metrics["let"][0]["let"]["steps"] == 4
    with torch.no_grad():
        after = loaded.model(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)  # LET folded into float weights: same function
    assert any(key.startswith("let.") for key in let_stage.artifacts())
    result = lowbit.quantize(
        load_model(str(tiny_opt_dir)),
        recipe="let+gptq",
        scheme="w3g32",
        dataset=str(text_file),
        nsamples=4,
        seqlen=16,
        options={"let": {"epochs": 1}, "engine": {"progress": False}},
    )
    assert len(result.weights) == 12


@pytest.mark.parametrize("recipe", ["omniquant+gptq", "desv+rtn", "let+omniquant"])
def test_impossible_combinations_are_refused(recipe):
    with pytest.raises(LowbitError, match="let"):
        build_config(recipe=recipe)


def test_mse_clip_init_lowers_the_weight_error_and_stays_below_the_reference_start():
    from lowbit.methods.omniquant.lwc import LWC_INIT

    weight = torch.randn(16, 256, generator=torch.Generator().manual_seed(2))
    weight[0, 0] = 25.0  # an outlier that min/max clipping should cut
    clip = LearnableClip(16, 256, parse_scheme("w2g128"))
    before = (clip.fake(weight) - weight).pow(2).sum().item()
    clip.init_from_search(weight)
    after = (clip.fake(weight) - weight).pow(2).sum().item()
    assert after < before
    assert float(clip.upper.max()) <= LWC_INIT and torch.equal(clip.upper, clip.lower)
