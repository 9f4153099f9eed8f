"""Reduced-precision tuning (issue 16): bf16 autocast in SignRound, TEQ and AWQ keeps the trained parameters, the
targets, the loss and the codes in fp32; `autocast=off` (what `auto` resolves to for now) is the fp32 path, bit for
bit; `--opt engine.dtype` fills every stage's `autocast` left at `auto`."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import make_llama
from lowbit.arch import arch_for
from lowbit.config import build_config, opts_to_mapping
from lowbit.engine import EngineOptions, ModelContext, call_block, capture_block_inputs, run_block_stages
from lowbit.engine.block_train import block_forward, block_mse
from lowbit.engine.causal_attention import block_attention
from lowbit.engine.precision import autocast_forward, resolve_autocast
from lowbit.errors import LowbitError
from lowbit.methods.awq.stage import AWQ, AWQOptions
from lowbit.methods.common.frozen import frozen
from lowbit.methods.rtn import RTN
from lowbit.methods.signround import stage as signround_module
from lowbit.methods.signround.stage import SignRound, SignRoundOptions
from lowbit.methods.signround.tune import TunedLinear
from lowbit.methods.teq import scales as teq_wrap
from lowbit.methods.teq.stage import TEQ, TEQOptions
from lowbit.quantizer import quantize_weight
from lowbit.scheme import parse_scheme

W2 = parse_scheme("w2g32")
W3 = parse_scheme("w3g32")
IDS = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(0))
CPU = torch.device("cpu")

# Measured before autocast existed (same settings as the runs below): the fp32 path must still produce them.
GOLDEN_SIGNROUND = [(4.3144457042217256e-05, 1.9685806706547736e-05), (0.00010669007897377015, 4.0632739663124085e-05)]
GOLDEN_TEQ_MSE = [(7.330360858759377e-06, 6.694828243780648e-06), (2.3307749870582484e-05, 2.2507618268718943e-05)]
GOLDEN_TEQ_CE = (5.73002, 5.73077)
GOLDEN_AWQ_RATIOS = [(0.85, 0.3, 0.6, 0.45), (0.9, 0.05, 0.25, 0.25)]


def run(stages, scheme, model=None):
    model = make_llama() if model is None else model
    return run_block_stages(model, arch_for(model), stages, scheme, IDS, EngineOptions(progress=False), seed=0)


def signround(**options):
    return SignRound(SignRoundOptions(**{"iters": 8, "batch_size": 4, **options}), W2)


def teq_mse(**options):
    return [TEQ(TEQOptions(**{"loss": "mse", "steps": 4, **options}), W3), RTN(RTN.Options(), W3)]


def run_teq_ce(**options):
    model = make_llama()
    ctx = ModelContext(model, arch_for(model), W3, IDS[:4, :16], CPU, 0)
    TEQ(TEQOptions(**{"steps": 4, "lr": 1e-2, "eval_samples": 2, **options}), W3).process_model(ctx)
    return model, ctx.metrics


def codes_of(found):
    return {name: (record.codes, record.scale, record.zero) for name, record in found.records.items()}


def assert_same_codes(a, b):
    assert a.keys() == b.keys()
    for name in a:
        for x, y in zip(a[name], b[name], strict=True):
            assert torch.equal(x, y), name


# --- options ---------------------------------------------------------------------------------------------------


def test_auto_resolves_to_fp32_for_the_tuners_and_keeps_omniquant_amp():
    cuda = torch.device("cuda")
    assert resolve_autocast("auto", CPU) == "off" and resolve_autocast("auto", cuda) == "off"
    assert resolve_autocast("bf16", CPU) == "bf16" and resolve_autocast("off", cuda) == "off"
    assert resolve_autocast("auto", cuda, 4) == "fp16" and resolve_autocast("auto", CPU, 4) == "off"


def test_a_bf16_default_applies_only_where_bf16_is_native(monkeypatch):
    import lowbit.engine.precision as precision

    monkeypatch.setattr(precision, "native_bf16", lambda device: device.type == "cpu")
    assert resolve_autocast("auto", CPU, default="bf16") == "bf16"
    assert resolve_autocast("auto", torch.device("cuda"), default="bf16") == "off"
    assert (
        resolve_autocast("auto", CPU, default="off") == "off" and resolve_autocast("off", CPU, default="bf16") == "off"
    )
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert resolve_autocast("auto", CPU, default="bf16") == "off"
    assert SignRound(SignRoundOptions(), W2).settings().autocast == "off"


def test_engine_dtype_fills_every_autocast_left_at_auto():
    options = opts_to_mapping(["engine.dtype=bf16", "signround.autocast=off"])
    config = build_config(recipe="awq+signround", scheme="w4g128", options=options)
    recorded = config.to_dict()["options"]
    assert recorded["awq"]["autocast"] == "bf16" and recorded["signround"]["autocast"] == "off"
    assert recorded["engine"]["dtype"] == "bf16"
    off = build_config(recipe="teq+omniquant", scheme="w4g128", options={"engine": {"dtype": "fp32"}})
    assert [spec.options.autocast for spec in off.stages] == ["off", "off"]  # also OmniQuant's CUDA fp16 AMP
    default = build_config(recipe="teq+signround", scheme="w4g128")
    assert [spec.options.autocast for spec in default.stages] == ["auto", "auto"] and default.dtype == "auto"
    with pytest.raises(LowbitError, match="engine.dtype"):
        build_config(recipe="rtn", options={"engine": {"dtype": "fp16"}})
    with pytest.raises(LowbitError, match="signround.autocast"):
        build_config(recipe="signround", options={"signround": {"autocast": "fp16"}})


# --- SignRound -------------------------------------------------------------------------------------------------


def test_signround_off_is_the_fp32_path_bit_for_bit():
    """off and engine.dtype=fp32 are one run, and it is the run measured before autocast existed."""
    off = run([signround(autocast="off")], W2)
    options = {"signround": {"iters": 8, "batch_size": 4}, "engine": {"dtype": "fp32"}}
    config = build_config(recipe="signround", scheme="w2g32", options=options)
    via_engine = run([SignRound(config.stages[0].options, W2)], W2)
    assert_same_codes(codes_of(off), codes_of(via_engine))
    for metrics, (first, best) in zip(off.metrics, GOLDEN_SIGNROUND, strict=True):
        assert metrics["autocast"] == "off"
        assert metrics["loss_first"] == pytest.approx(first, rel=1e-5)
        assert metrics["best_loss"] == pytest.approx(best, rel=1e-5)


@pytest.mark.parametrize("native", [True, False])
def test_signround_auto_is_bf16_where_bf16_is_native_else_fp32(monkeypatch, native):
    """SignRound's measured default: auto = bf16 on hardware with native bf16, the fp32 run elsewhere."""
    import lowbit.engine.precision as precision

    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    default = run([signround()], W2)
    explicit = run([signround(autocast="bf16" if native else "off")], W2)
    assert_same_codes(codes_of(default), codes_of(explicit))
    assert {metrics["autocast"] for metrics in default.metrics} == {"bf16" if native else "off"}


def test_signround_bf16_keeps_parameters_fp32_and_codes_from_the_fp32_weights(monkeypatch):
    fp32 = run([signround(autocast="off")], W2)
    seen = []
    real = signround_module.tune_block

    def spy(layers, *args, **kwargs):
        seen.append(list(layers))
        return real(layers, *args, **kwargs)

    monkeypatch.setattr(signround_module, "tune_block", spy)
    model = make_llama()
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    found = run([signround(autocast="bf16")], W2, model)
    assert len(seen) == 2
    for index, (metrics, layers) in enumerate(zip(found.metrics, seen, strict=True)):
        assert metrics["autocast"] == "bf16" and math.isfinite(metrics["best_loss"])
        assert metrics["loss_first"] != fp32.metrics[index]["loss_first"]  # the forward really ran in bf16
        for layer in layers:
            name = f"model.layers.{index}.{layer.name}"
            assert all(p.dtype == torch.float32 for p in (layer.weight, *layer.parameters()))
            assert torch.equal(layer.weight, original[f"{name}.weight"])
            v, alpha, beta = (p.detach() for p in layer.parameters())
            expected = quantize_weight(original[f"{name}.weight"], W2, v=v, gamma_hi=alpha.clamp(0, 1),
                                       gamma_lo=beta.clamp(0, 1))  # fmt: skip
            record = found.records[name]
            assert torch.equal(record.codes, expected.codes) and torch.equal(record.scale, expected.scale)
            assert torch.equal(record.zero, expected.zero)


class ReplaySpy(SignRound):
    """SignRound that records the precision of the engine's replays and the chain input of each block."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def process_block(self, ctx):
        self.seen.append((ctx.autocast, ctx.inputs.clone(), ctx.targets.clone()))
        super().process_block(ctx)


def replay_run(stages, engine: EngineOptions):
    model = make_llama()
    return model, run_block_stages(model, arch_for(model), stages, W2, IDS, engine, seed=0)


def test_signround_bf16_replays_the_float_targets_and_the_chain_in_bf16():
    """auto-round's way: the engine's block replays run in the tuner's bf16; outputs and targets stay fp32."""
    stage = ReplaySpy(SignRoundOptions(iters=2, batch_size=4, autocast="bf16"), W2)
    model, found = replay_run([stage], EngineOptions(progress=False))
    assert [seen[0] for seen in stage.seen] == ["bf16", "bf16"]
    assert [metrics.get("replay_autocast") for metrics in found.metrics] == ["bf16", "bf16"]
    arch = arch_for(model)
    block0 = arch.blocks(model)[0]  # quantized in place: block 1's chain input is block 0 under bf16 autocast
    kwargs = capture_block_inputs(make_llama(), arch, IDS, batch_size=8, device=CPU).kwargs
    with block_attention(block0, arch.attention, "chunked"):  # the engine's attention on CPU (engine.attention=auto)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            chain = call_block(block0, stage.seen[0][1], kwargs).float()
        fp32_chain = call_block(block0, stage.seen[0][1], kwargs).detach()
    assert stage.seen[1][1].dtype == torch.float32 and stage.seen[1][2].dtype == torch.float32
    assert torch.equal(stage.seen[1][1], chain) and not torch.equal(stage.seen[1][1], fp32_chain)


@pytest.mark.parametrize(
    "stages, engine",
    [
        (lambda: [ReplaySpy(SignRoundOptions(iters=2, batch_size=4, autocast="bf16"), W2)], {"replay": "fp32"}),
        (lambda: [ReplaySpy(SignRoundOptions(iters=2, batch_size=4, autocast="off"), W2)], {}),
        (lambda: [AWQ(AWQOptions(), W2), ReplaySpy(SignRoundOptions(iters=2, batch_size=4, autocast="bf16"), W2)], {}),
    ],
    ids=["engine.replay=fp32", "signround-fp32", "mixed-with-an-fp32-stage"],
)
def test_replays_stay_fp32_unless_every_data_stage_asks_for_the_same_reduced_precision(stages, engine):
    built = stages()
    _, found = replay_run(built, EngineOptions(progress=False, **engine))
    assert [seen[0] for seen in built[-1].seen] == ["off", "off"]
    assert all("replay_autocast" not in metrics for metrics in found.metrics)


def tiny_block(fast: bool = True, seed: int = 1):
    """Block 0 of a tiny Llama with its tuned linears (V, alpha, beta off their identity start), inputs and kwargs."""
    model = make_llama()
    arch = arch_for(model)
    block = arch.blocks(model)[0]
    generator = torch.Generator().manual_seed(seed)
    layers = [TunedLinear.wrap(name, linear, W2, fast=fast) for name, linear in arch.linears(block).items()]
    with torch.no_grad():
        for layer in layers:
            layer.v.copy_(torch.rand(layer.v.shape, generator=generator) - 0.5)
            layer.alpha.copy_(0.7 + 0.4 * torch.rand(layer.alpha.shape, generator=generator))  # some clamp at 1
            layer.beta.copy_(0.7 + 0.4 * torch.rand(layer.beta.shape, generator=generator))
    hidden = torch.randn(2, 16, 64, generator=generator)
    position = torch.arange(16)[None]
    kwargs = {"position_embeddings": model.model.rotary_emb(hidden, position), "position_ids": position}
    target = torch.randn(2, 16, 64, generator=generator) * 0.1 + hidden
    return block, layers, hidden, kwargs, target


def two_stage_backward(forward, layers, hidden, target):
    """SignRound's path: QDQ once, the block on detached copies, their gradients pushed through the QDQ graph."""
    qdq = [layer.qdq() for layer in layers]
    leaves = {layer.name: q.detach().requires_grad_() for layer, q in zip(layers, qdq, strict=True)}
    block_mse(forward(leaves, hidden), target).backward()
    torch.autograd.backward(qdq, [leaves[layer.name].grad for layer in layers])
    return leaves


@pytest.mark.parametrize("mode", ["off", "bf16"])
def test_signround_gradients_equal_the_single_graph_autograd_reference(mode):
    """QDQ once + block on detached copies + one push through the QDQ graph = autograd over the whole graph."""
    grads = {}
    for two_stage in (True, False):
        block, layers, hidden, kwargs, target = tiny_block()
        prefix = {layer.name: f"{layer.name}.weight" for layer in layers}
        forward = autocast_forward(block_forward(block, prefix, kwargs), mode, CPU)
        with frozen(block):
            if two_stage:
                two_stage_backward(forward, layers, hidden, target)
            else:
                block_mse(forward({layer.name: layer.qdq() for layer in layers}, hidden), target).backward()
        grads[two_stage] = [p.grad for layer in layers for p in layer.parameters()]
    for got, want in zip(grads[True], grads[False], strict=True):
        assert got.dtype == torch.float32 and bool(want.abs().max() > 0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


class _CountMatmuls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_backward_computes_only_the_qdq_weight_gradients_and_the_needed_input_gradients():
    """7 forward matmuls; backward 7 dWq + dX of o/gate/up/down only (q/k/v inputs need none), no frozen-W dW."""
    block, layers, hidden, kwargs, target = tiny_block()
    forward = block_forward(block, {layer.name: f"{layer.name}.weight" for layer in layers}, kwargs)
    with frozen(block):
        qdq = [layer.qdq() for layer in layers]
        leaves = {layer.name: q.detach().requires_grad_() for layer, q in zip(layers, qdq, strict=True)}
        with _CountMatmuls() as forward_mm:
            loss = block_mse(forward(leaves, hidden), target)
        with _CountMatmuls() as backward_mm:
            loss.backward()
    assert (forward_mm.count, backward_mm.count) == (7, 7 + 4)
    assert all(p.grad is None for p in block.parameters())


def test_bf16_gradients_reach_the_fp32_parameters_in_fp32():
    block, layers, hidden, kwargs, _ = tiny_block()
    forward = autocast_forward(block_forward(block, {x.name: f"{x.name}.weight" for x in layers}, kwargs), "bf16", CPU)
    with frozen(block):
        with torch.no_grad():
            assert forward({layer.name: layer.qdq() for layer in layers}, hidden).dtype == torch.float32
        leaves = two_stage_backward(forward, layers, hidden, torch.zeros_like(hidden))
    for layer in layers:
        assert leaves[layer.name].grad.dtype == torch.float32
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())
    assert all(p.grad is None for p in block.parameters())  # nothing flows into the frozen weights


# --- TEQ -------------------------------------------------------------------------------------------------------


def test_teq_blockwise_off_is_the_fp32_path_and_bf16_trains_fp32_scales(monkeypatch):
    off = run(teq_mse(autocast="off"), W3)
    assert_same_codes(codes_of(off), codes_of(run(teq_mse(), W3)))
    for metrics, golden in zip(off.metrics, GOLDEN_TEQ_MSE, strict=True):
        losses = (metrics["teq"]["ones"]["final_loss"], metrics["teq"]["inv_sqrt_wmax"]["final_loss"])
        assert losses == pytest.approx(golden, rel=1e-5)

    scale_sets, quantized = [], []
    real_fold, real_fake_quant = teq_wrap.fold_scale_set, teq_wrap.fake_quant
    monkeypatch.setattr("lowbit.methods.teq.stage.fold_scale_set", lambda s: (scale_sets.append(s), real_fold(s))[1])

    def fake_quant_spy(weight, *args, **kwargs):
        quantized.append((weight.dtype, torch.is_autocast_enabled("cpu")))
        return real_fake_quant(weight, *args, **kwargs)

    monkeypatch.setattr(teq_wrap, "fake_quant", fake_quant_spy)
    bf16 = run(teq_mse(autocast="bf16"), W3)
    for metrics, reference in zip(bf16.metrics, off.metrics, strict=True):
        for init in ("ones", "inv_sqrt_wmax"):
            outcome = metrics["teq"][init]
            assert outcome["autocast"] == "bf16" and math.isfinite(outcome["final_loss"])
            assert outcome["loss_trace"] != reference["teq"][init]["loss_trace"]  # the forward really ran in bf16
    assert scale_sets and all(p.dtype == torch.float32 for s in scale_sets for p in s.parameters())
    assert quantized and set(quantized) == {(torch.float32, False)}  # Q(W_eff) in fp32, outside autocast
    for record in bf16.records.values():
        record.validate()


def test_teq_ce_bf16_trains_and_folds_in_fp32():
    off_model, off = run_teq_ce(autocast="off")
    assert (off["inits"]["ones"]["final_loss"], off["inits"]["inv_sqrt_wmax"]["final_loss"]) == pytest.approx(
        GOLDEN_TEQ_CE, abs=2e-5
    )
    model, metrics = run_teq_ce(autocast="bf16")
    for init in ("ones", "inv_sqrt_wmax"):
        outcome = metrics["inits"][init]
        assert outcome["autocast"] == "bf16" and math.isfinite(outcome["final_loss"])
        assert outcome["loss_trace"] != off["inits"][init]["loss_trace"]
    assert all(p.dtype == torch.float32 and p.grad is None for p in model.parameters())
    assert not any(isinstance(m, teq_wrap.TEQLinear) for m in model.modules())


# --- AWQ -------------------------------------------------------------------------------------------------------


def test_awq_off_is_the_fp32_path_and_bf16_only_changes_the_replayed_groups():
    # the golden ratios were recorded on llm-awq's float chain (search_inputs=float), before autocast existed
    def awq(**options):
        return AWQ(AWQOptions(search_inputs="float", **options), W3)

    stage_off, stage_bf16 = awq(autocast="off"), awq(autocast="bf16")
    off = run([stage_off, RTN(RTN.Options(), W3)], W3)
    assert_same_codes(codes_of(off), codes_of(run([awq(), RTN(RTN.Options(), W3)], W3)))
    for metrics, ratios in zip(off.metrics, GOLDEN_AWQ_RATIOS, strict=True):
        assert tuple(info["ratio"] for info in metrics["awq_scale"].values()) == ratios
    bf16 = run([stage_bf16, RTN(RTN.Options(), W3)], W3)
    for metrics, reference in zip(bf16.metrics, off.metrics, strict=True):
        assert metrics["awq_autocast"] == "bf16" and reference["awq_autocast"] == "off"
        for prev, info in metrics["awq_scale"].items():
            assert math.isfinite(info["loss"])
            gram = prev in ("self_attn.v_proj", "mlp.up_proj")  # linear-only groups: float64 Gram loss, unchanged
            assert (info["loss"] == reference["awq_scale"][prev]["loss"]) == gram, prev
    assert all(t.dtype == torch.float32 for t in stage_bf16.artifacts().values())
    for record in bf16.records.values():
        record.validate()


# --- GPTQ ------------------------------------------------------------------------------------------------------


def test_gptq_auto_is_the_fp32_path_and_bf16_collects_hessians_and_replays_in_bf16(monkeypatch):
    from lowbit.methods.gptq import passes as gptq_module
    from lowbit.methods.gptq.stage import GPTQ, GPTQOptions

    grams = []
    real = gptq_module.input_gram

    def spy(x, exact=False):
        grams.append(x.dtype)
        return real(x, exact)

    monkeypatch.setattr(gptq_module, "input_gram", spy)
    off = run([GPTQ(GPTQOptions(autocast="off"), W3)], W3)
    assert set(grams) == {torch.float32}
    assert_same_codes(codes_of(off), codes_of(run([GPTQ(GPTQOptions(), W3)], W3)))  # auto: fp32 until measured
    grams.clear()
    bf16 = run([GPTQ(GPTQOptions(autocast="bf16"), W3)], W3)
    # the block ran in bf16: o_proj and down_proj see bf16 activations (RMSNorm outputs keep the fp32 input dtype);
    # input_gram multiplies in fp32 either way
    assert torch.bfloat16 in grams
    assert [m["gptq_autocast"] for m in bf16.metrics] == ["bf16", "bf16"]
    assert [m.get("replay_autocast") for m in bf16.metrics] == ["bf16", "bf16"]
    assert [m["gptq_autocast"] for m in off.metrics] == ["off", "off"]
    changed = 0
    for name, record in bf16.records.items():
        record.validate()
        reference = off.records[name]
        assert record.scale.dtype == reference.scale.dtype
        changed += not torch.equal(record.codes, reference.codes)
        # bf16 activations move the Hessian slightly (8 x 32 tokens on a random model: far from well conditioned)
        assert (record.codes == reference.codes).float().mean() > 0.5, name
    assert changed > 0  # the bf16 path really ran


def test_engine_dtype_reaches_gptq():
    config = build_config(recipe="gptq", scheme="w4g128", options={"engine": {"dtype": "bf16"}})
    assert config.stages[0].options.autocast == "bf16"
    assert build_config(recipe="gptq", scheme="w4g128").stages[0].options.autocast == "auto"
