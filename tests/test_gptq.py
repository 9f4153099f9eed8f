"""GPTQ (specs/gptq.md §10): Hessian, solver, retries, g_idx, and the stage on the engine."""

import copy

import pytest
import torch

import lowbit
from lowbit.arch import arch_for
from lowbit.engine import EngineOptions, run_block_stages
from lowbit.engine.stage import NoOptions
from lowbit.methods.gptq import GPTQ, GPTQOptions
from lowbit.methods.hessian import HessianAccumulator, gptq_quantize
from lowbit.methods.rtn import RTN
from lowbit.models import LoadedModel
from lowbit.quantizer import quantize_weight
from lowbit.scheme import QuantScheme, parse_scheme

K = 576  # 4.5 x 128: a partial last group at g128, as SmolLM2


def correlated_layer(m=32, k=K, tokens=1200, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / k**0.5
    x = torch.randn(tokens, k, generator=gen) @ mix + 0.2 * torch.randn(tokens, k, generator=gen)
    x[:, :8] *= 6  # a few outlier channels, as in real activations
    w = torch.randn(m, k, generator=gen)
    acc = HessianAccumulator(k)
    acc.add_batch(x[None])
    return w, x, acc.H


def output_error(x, w, w_hat):
    return float((x @ (w - w_hat).t()).square().sum())


def test_running_hessian_equals_two_over_n_xtx():
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, 5, 16, generator=gen) for n in (3, 1, 4)]
    acc = HessianAccumulator(16)
    for batch in batches:
        acc.add_batch(batch)
    rows = torch.cat(batches).reshape(-1, 16).double()
    expected = 2 / 8 * rows.t() @ rows
    assert acc.nsamples == 8
    torch.testing.assert_close(acc.H.double(), expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("scheme", ["w4g128", "w3g32-sym", "w8g-1", "w4g-1-sym_full"])
def test_identity_hessian_gives_rtn_codes(scheme):
    s = parse_scheme(scheme)
    w = torch.randn(32, K, generator=torch.Generator().manual_seed(2))
    for act_order in (False, True):
        result = gptq_quantize(w, 3.0 * torch.eye(K), s, act_order=act_order)
        rtn = quantize_weight(w, s)
        assert torch.equal(result.record.codes, rtn.codes)
        assert torch.equal(result.record.scale, rtn.scale)
        assert torch.equal(result.record.zero, rtn.zero)


@pytest.mark.parametrize("scheme", ["w4g128", "w2g128", "w3g64-sym", "w2g32", "w4g-1", "w3g128-sym_full"])
@pytest.mark.parametrize("act_order,static_groups", [(False, False), (True, False), (True, True)])
def test_gptq_output_error_below_rtn(scheme, act_order, static_groups):
    w, x, H = correlated_layer()
    s = parse_scheme(scheme)
    result = gptq_quantize(w, H, s, act_order=act_order, static_groups=static_groups)
    result.record.validate()
    assert torch.equal(result.record.dequantize(), result.weight)  # the record is what GPTQ produced
    assert output_error(x, w, result.weight) < 0.9 * output_error(x, w, quantize_weight(w, s).dequantize())


def test_mse_option_is_valid_and_beats_rtn():
    w, x, H = correlated_layer(seed=3)
    s = parse_scheme("w3g128")
    result = gptq_quantize(w, H, s, mse=True)
    result.record.validate()
    assert torch.equal(result.record.dequantize(), result.weight)
    assert output_error(x, w, result.weight) < output_error(x, w, quantize_weight(w, s).dequantize())


def test_g_idx_cases():
    w, _, H = correlated_layer(seed=4)
    s = parse_scheme("w4g128")
    trivial = torch.arange(K, dtype=torch.int32) // 128
    plain = gptq_quantize(w, H, s)
    static = gptq_quantize(w, H, s, act_order=True, static_groups=True)
    desc = gptq_quantize(w, H, s, act_order=True)
    assert plain.record.g_idx is None and static.record.g_idx is None  # g_idx[i] = i // g: nothing to store
    assert desc.record.g_idx is not None and not torch.equal(desc.record.g_idx, trivial)
    counts = torch.bincount(desc.record.g_idx.long())
    assert counts.tolist() == [128, 128, 128, 128, 64]  # each group has g members, the partial one 64
    for result in (plain, static, desc):
        result.record.validate()
        assert torch.equal(result.record.dequantize(), result.weight)
    # the map really is the act-order one: the first permuted group holds the largest diag(H) entries
    top = torch.argsort(torch.diag(H), descending=True, stable=True)[:128]
    assert bool((desc.record.g_idx[top] == 0).all())


def test_zero_input_column_gives_zero_weight_column_with_zero_point_codes():
    w, x, _ = correlated_layer(seed=5)
    x[:, 17] = 0
    acc = HessianAccumulator(K)
    acc.add_batch(x)
    result = gptq_quantize(w, acc.H, parse_scheme("w4g128"))
    assert result.dead_columns == 1
    assert bool((result.weight[:, 17] == 0).all())
    assert torch.equal(result.record.codes[:, 17].int(), result.record.zero[:, 0])


def test_rank_deficient_hessian_retries_with_more_damping(caplog):
    gen = torch.Generator().manual_seed(6)
    v = torch.randn(3, 64, generator=gen) * 1e3
    H = v.t() @ v  # rank 3 of 64
    w = torch.randn(16, 64, generator=gen)
    result = gptq_quantize(w, H, parse_scheme("w4g32"), percdamp=1e-8)
    assert result.retries >= 1 and result.percdamp > 1e-8 and not result.fallback_rtn
    assert bool(torch.isfinite(result.weight).all())
    result.record.validate()


def test_never_positive_definite_falls_back_to_rtn():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(7))
    result = gptq_quantize(w, -torch.eye(32), parse_scheme("w4g32"))
    assert result.fallback_rtn and result.percdamp == pytest.approx(1.0)
    assert torch.equal(result.record.codes, quantize_weight(w, parse_scheme("w4g32")).codes)


def calibration_ids(n=8, length=32, seed=0):
    return torch.randint(0, 320, (n, length), generator=torch.Generator().manual_seed(seed))


def run_engine(model, stage, scheme, ids):
    found = run_block_stages(model, arch_for(model), [stage], scheme, ids, EngineOptions(progress=False), seed=0)
    return found.records, found.metrics


def block0_error(model, reference, ids):
    arch = arch_for(model)
    outs = []
    for m in (model, reference):
        seen = []
        handle = arch.blocks(m)[0].register_forward_hook(lambda _m, _a, out, seen=seen: seen.append(out))
        with torch.no_grad():
            m(input_ids=ids, use_cache=False)
        handle.remove()
        outs.append(seen[0][0] if isinstance(seen[0], tuple) else seen[0])
    return float((outs[0] - outs[1]).square().mean())


def test_gptq_stage_beats_rtn_on_calibration_and_records_match_weights(tiny_model):
    scheme = parse_scheme("w3g32")
    ids = calibration_ids()
    rtn_model, gptq_model = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    run_engine(rtn_model, RTN(NoOptions(), scheme), scheme, None)
    records, metrics = run_engine(gptq_model, GPTQ(GPTQOptions(), scheme), scheme, ids)
    assert block0_error(gptq_model, tiny_model, ids) < block0_error(rtn_model, tiny_model, ids)
    params = dict(gptq_model.named_parameters())
    for name, record in records.items():
        record.validate()
        assert torch.equal(record.dequantize(), params[f"{name}.weight"].detach())
    assert set(metrics[0]["gptq"]) == set(arch_for(tiny_model).linear_names)


@pytest.mark.parametrize("options", [GPTQOptions(), GPTQOptions(act_order=True, true_sequential=False)])
def test_gptq_is_deterministic(options):
    from conftest import make_llama

    scheme = parse_scheme("w4g32")
    runs = [run_engine(make_llama(), GPTQ(options, scheme), scheme, calibration_ids())[0] for _ in range(2)]
    for name, record in runs[0].items():
        assert torch.equal(record.codes, runs[1][name].codes)
        assert torch.equal(record.scale, runs[1][name].scale)


def test_gptq_recipe_through_the_api(tiny_llama_dir, text_file):
    from lowbit.models import load_model

    loaded = load_model(str(tiny_llama_dir))
    assert isinstance(loaded, LoadedModel)
    result = lowbit.quantize(
        loaded,
        recipe="gptq",
        scheme=QuantScheme(bits=4, group_size=32),
        dataset=str(text_file),
        nsamples=4,
        seqlen=32,
        options={"gptq": {"act_order": True, "static_groups": True}, "engine": {"progress": False}},
    )
    assert len(result.weights) == 14


@pytest.mark.parametrize("make_name", ["make_llama", "make_opt"])
def test_early_stopped_hessians_equal_those_of_a_full_block_forward(make_name):
    import conftest
    from lowbit.engine import BlockContext, capture_block_inputs
    from lowbit.methods.gptq import collect_hessians

    model = getattr(conftest, make_name)()
    arch = arch_for(model)
    captured = capture_block_inputs(model, arch, calibration_ids(n=5), batch_size=2, device=torch.device("cpu"))
    ctx = BlockContext(0, arch.block_name(0), arch.blocks(model)[0], arch, parse_scheme("w4g32"), captured.kwargs,
                       torch.device("cpu"), batch_size=2, seed=0, inputs=captured.hidden)  # fmt: skip
    for subset in arch.sequential:
        early = collect_hessians(ctx, subset)
        full = {name: HessianAccumulator(ctx.linears()[name].in_features) for name in subset}
        handles = [ctx.linears()[name].register_forward_hook(lambda _m, a, _o, acc=full[name]: acc.add_batch(a[0]))
                   for name in subset]  # fmt: skip
        ctx.run(ctx.inputs)
        for handle in handles:
            handle.remove()
        for name in subset:
            assert early[name].nsamples == full[name].nsamples > 0
            torch.testing.assert_close(early[name].H, full[name].H, rtol=0, atol=0)
