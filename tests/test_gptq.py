"""GPTQ (specs/gptq.md §10): Hessian, solver, retries, g_idx, and the stage on the engine."""

import copy

import pytest
import torch

import lowbit
from lowbit.arch import arch_for
from lowbit.engine import EngineOptions, run_block_stages
from lowbit.engine.stage import NoOptions
from lowbit.methods.common.gram import gram_matrix
from lowbit.methods.gptq.solve import HessianAccumulator, gptq_quantize
from lowbit.methods.gptq.stage import GPTQ, GPTQOptions
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


def test_exact_hessian_does_not_depend_on_how_the_samples_are_batched_or_split():
    gen = torch.Generator().manual_seed(2)
    samples = torch.randn(8, 33, 600, generator=gen) * torch.logspace(-2, 2, 600)  # k > one Gram panel
    one = HessianAccumulator(600, exact=True)
    for batch in samples.split(3):  # one process: batches of 3, 3, 2
        one.add_batch(batch)
    ranks = [HessianAccumulator(600, exact=True) for _ in range(2)]  # two ranks: 4 + 4 samples, other batches
    for rank, shard in zip(ranks, samples.split(4), strict=True):
        for batch in shard.split(1):
            rank.add_batch(batch)
    merged = HessianAccumulator(600, exact=True)
    merged.sum, merged.nsamples = ranks[0].sum + ranks[1].sum, 8  # what reduce_hessians adds, in rank order
    assert torch.equal(merged.H, one.H)
    running = HessianAccumulator(600)
    for batch in samples.split(3):
        running.add_batch(batch)
    assert not torch.equal(running.H, one.H)  # the reference's running fp32 average rounds differently ...
    torch.testing.assert_close(running.H, one.H, rtol=1e-4, atol=1e-4 * float(one.H.abs().max()))  # ... but is H


@pytest.mark.parametrize("k", [7, 16, 40])  # one panel, whole panels, a partial last panel
def test_panelled_gram_is_the_symmetric_full_product(k):
    rows = torch.randn(300, k, generator=torch.Generator().manual_seed(k))
    result = gram_matrix(rows, panel=8)
    torch.testing.assert_close(result.double(), rows.double().t() @ rows.double(), rtol=1e-5, atol=1e-4)


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
    from lowbit.methods.gptq.passes import collect_hessians

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


def test_entry_module_is_the_common_parent_that_holds_the_previous_subset():
    from lowbit.methods.gptq.passes import entry_module

    assert entry_module(("mlp.down_proj",), ("mlp.up_proj", "mlp.gate_proj")) == "mlp"
    assert entry_module(("self_attn.o_proj",), ("self_attn.k_proj", "self_attn.q_proj")) == "self_attn"
    assert entry_module(("mlp.up_proj", "mlp.gate_proj"), ("self_attn.o_proj",)) is None  # its input moved
    assert entry_module(("fc2",), ("fc1",)) is None  # OPT: direct children of the block
    assert entry_module(("mlp.experts.0.down_proj", "mlp.experts.1.down_proj"), ("mlp.experts.0.up_proj",)) == (
        "mlp.experts"
    )
    assert entry_module(("mlp.down_proj",), ()) is None


@pytest.mark.parametrize("make_name", ["make_llama", "make_opt"])
def test_passes_started_at_a_recorded_module_give_the_whole_block_hessians(make_name, monkeypatch):
    """The o_proj (out_proj) pass starts at self_attn, LLaMA's down_proj pass at mlp, on the calls recorded in the
    pass before; the quantized block is bit-identical to the one whose every pass runs the whole block."""
    import conftest
    import lowbit.methods.gptq.stage as gptq_module

    scheme = parse_scheme("w3g32")
    starts = []
    real_collect = gptq_module.collect_hessians

    def spy(ctx, names, precision="off", *, start=None, record=None, exact=False):
        starts.append(start.path if start is not None else None)
        return real_collect(ctx, names, precision, start=start, record=record, exact=exact)

    monkeypatch.setattr(gptq_module, "collect_hessians", spy)
    make = getattr(conftest, make_name)

    def quantize():
        model = make()
        stage = GPTQ(GPTQOptions(act_order=True), scheme)
        engine = EngineOptions(progress=False, batch_size=3)  # batches of 3, 3 and 2 samples
        return run_block_stages(model, arch_for(model), [stage], scheme, calibration_ids(), engine, seed=0).records

    shortcut = quantize()
    monkeypatch.setattr(gptq_module, "entry_module", lambda *_: None)
    whole = quantize()
    blocks = len(arch_for(make()).blocks(make()))
    expected = [None, "self_attn", None, "mlp" if make_name == "make_llama" else None]  # OPT's fc1/fc2: no parent
    assert starts[: 4 * blocks] == expected * blocks and starts[4 * blocks :] == [None] * 4 * blocks
    for name, record in whole.items():
        assert torch.equal(record.codes, shortcut[name].codes), name
        assert torch.equal(record.scale, shortcut[name].scale), name


def gptq_block_context(model, scheme):
    from lowbit.engine import BlockContext, capture_block_inputs

    arch = arch_for(model)
    captured = capture_block_inputs(model, arch, calibration_ids(n=5), batch_size=2, device=torch.device("cpu"))
    return BlockContext(0, arch.block_name(0), arch.blocks(model)[0], arch, scheme, captured.kwargs,
                        torch.device("cpu"), batch_size=2, seed=0, inputs=captured.hidden)  # fmt: skip


@pytest.mark.parametrize("case", ["llama", "llama_low_memory", "llama_no_memory", "opt", "w4a8", "post_norm"])
def test_gptq_hands_the_engine_the_chain_only_where_residual_plus_mlp_is_the_block(case, monkeypatch):
    """LLaMA's block output is the residual entering post_attention_layernorm plus the MLP: GPTQ rebuilds the chain
    from its passes' records (down_proj on its recorded inputs, or the MLP on its own where those would not fit in
    memory), bit for bit the block's replay; with no room for any record, the passes run the whole block. OPT (no
    MLP module), a W-A scheme (the chain runs W-A) and a block whose output is not that sum (checked on the first
    batch) get the engine's replay."""
    import conftest
    import lowbit.methods.gptq.stage as gptq_module

    scheme = parse_scheme("w4a8g32" if case == "w4a8" else "w4g32")
    ctx = gptq_block_context(conftest.make_opt() if case == "opt" else conftest.make_llama(), scheme)
    hidden_bytes = ctx.inputs.numel() * ctx.inputs.element_size()
    if case == "llama_low_memory":  # room for the hidden-size records, not for down_proj's 4x wider inputs
        monkeypatch.setattr(gptq_module, "fits_in_memory", lambda nbytes: nbytes <= 2 * hidden_bytes)
    if case == "llama_no_memory":  # no records at all: whole-block passes and the engine's replay
        monkeypatch.setattr(gptq_module, "fits_in_memory", lambda nbytes: False)
    if case == "post_norm":  # as a post-feedforward norm would: the output is no longer residual + mlp
        ctx.block.register_forward_hook(lambda _m, _a, out: out * 1.001 if isinstance(out, torch.Tensor) else out)
    GPTQ(GPTQOptions(), scheme).process_block(ctx)
    if case.startswith("llama") and case != "llama_no_memory":
        assert ctx.metrics["gptq_chain"] == ("residual + mlp" if "low" in case else "residual + mlp.down_proj")
        assert torch.equal(ctx.outputs, ctx.run(ctx.inputs))
    else:
        assert ctx.outputs is None and ctx.metrics["gptq_chain"] == "block forward"


def test_fits_in_memory_compares_with_the_memory_available_now():
    from lowbit.methods.gptq.passes import fits_in_memory

    assert fits_in_memory(1) and not fits_in_memory(1 << 60)
