"""AWQ (specs/awq.md §9): exact folds, scale search, GQA skip, auto-clip, recipes with a quantizer after it."""

import contextlib
import copy

import pytest
import torch

import lowbit
from lowbit.arch import arch_for
from lowbit.engine import BlockStage, EngineOptions, call_block, capture_block_inputs, run_block_stages
from lowbit.methods.awq.clip import apply_clip, search_clip
from lowbit.methods.awq.stage import AWQ, AWQOptions, normalised_scales
from lowbit.methods.common.fold import fold_group
from lowbit.quantizer import fake_quant
from lowbit.scheme import QuantScheme, parse_scheme

SCHEME = parse_scheme("w3g32")


def calibration_ids(n=8, length=32, seed=0):
    return torch.randint(0, 320, (n, length), generator=torch.Generator().manual_seed(seed))


def block_outputs(model, ids):
    arch = arch_for(model)
    captured = capture_block_inputs(model, arch, ids, batch_size=8, device=torch.device("cpu"))
    with torch.no_grad():
        return [call_block(block, captured.hidden, captured.kwargs) for block in arch.blocks(model)]


def random_norms(model):
    """Non-trivial norm weights/biases so the folds are really exercised."""
    gen = torch.Generator().manual_seed(3)
    arch = arch_for(model)
    with torch.no_grad():
        for block in arch.blocks(model):
            for name in arch.norms:
                norm = block.get_submodule(name)
                norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=gen))
                if getattr(norm, "bias", None) is not None:
                    norm.bias.copy_(0.1 * torch.randn(norm.bias.shape, generator=gen))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_every_fold_is_exact(tiny_model, kv_heads):
    from conftest import make_llama

    model = make_llama(kv_heads=kv_heads) if arch_for(tiny_model).family == "llama-like" else tiny_model
    random_norms(model)
    ids = calibration_ids()
    before = block_outputs(model, ids)
    arch = arch_for(model)
    gen = torch.Generator().manual_seed(4)
    kinds = set()
    for block in arch.blocks(model):
        for group in arch.groups_for(block):
            width = block.get_submodule(group.linears[0]).in_features
            fold_group(block, group, 0.25 + 3 * torch.rand(width, generator=gen), arch=arch)
            kinds.add(group.prev)
    after = block_outputs(model, ids)
    for want, got in zip(before, after, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    has_vo = any(g.prev.endswith("v_proj") for g in arch.groups_for(arch.blocks(model)[0]))
    assert len(kinds) == (4 if has_vo else 3)
    assert has_vo == (arch.family == "opt" or kv_heads == 4)  # GQA skips v->o


def test_awq_scaling_leaves_float_outputs_unchanged(tiny_model):
    random_norms(tiny_model)
    ids = calibration_ids()
    reference = copy.deepcopy(tiny_model)
    stage = AWQ(AWQOptions(clip=False), SCHEME)
    metrics = run_block_stages(
        tiny_model, arch_for(tiny_model), [stage], SCHEME, ids, EngineOptions(progress=False), 0
    ).metrics
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    for block in metrics:
        for info in block["awq_scale"].values():
            assert info["loss"] <= info["loss_r0"]  # r = 0 (s = 1) is on the grid
    changed = any(not torch.equal(a, b) for a, b in zip(tiny_model.parameters(), reference.parameters(), strict=True))
    assert changed


def test_gqa_skips_v_to_o():
    from conftest import make_llama

    model = make_llama(kv_heads=2)
    stage = AWQ(AWQOptions(clip=False), SCHEME)
    metrics = run_block_stages(
        model, arch_for(model), [stage], SCHEME, calibration_ids(), EngineOptions(progress=False), 0
    ).metrics
    assert metrics[0]["awq_scale"]["skipped"] == ["self_attn.v_proj"]
    assert "self_attn.v_proj" not in metrics[0]["awq_scale"]


def test_normalised_scales():
    xbar = torch.rand(50, generator=torch.Generator().manual_seed(5)) + 0.01
    assert torch.equal(normalised_scales(xbar, 0.0), torch.ones(50))
    for r in (0.3, 0.95):
        s = normalised_scales(xbar, r)
        assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-5)


def test_scale_search_picks_the_hand_computed_argmin():
    """A single-linear group (o_proj-like): the losses recomputed here by the formula pick the same ratio."""
    from conftest import make_llama

    model = make_llama()
    arch = arch_for(model)
    block = arch.blocks(model)[0]
    group = next(g for g in arch.scale_groups if g.prev == "mlp.up_proj")
    linear = block.get_submodule("mlp.down_proj")
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 16, 256, generator=gen) * (torch.rand(256, generator=gen) * 4)
    from lowbit.engine import BlockContext

    ctx = BlockContext(0, "b", block, arch, SCHEME, {}, torch.device("cpu"), 2, 0)
    stage = AWQ(AWQOptions(), SCHEME)
    s, info = stage.search_scale(ctx, group, x, None)
    w = linear.weight.detach().clone()
    y0 = x @ w.t()
    xbar = x.reshape(-1, 256).abs().mean(0)
    losses = []
    for i in range(20):
        si = normalised_scales(xbar, i / 20)
        q = fake_quant(w * si, stage.search_scheme) / si
        losses.append(float((x @ q.t() - y0).double().square().mean()))
    best = min(range(20), key=lambda i: losses[i])
    assert info["ratio"] == best / 20
    assert info["loss"] == pytest.approx(losses[best], rel=1e-4)
    assert torch.equal(linear.weight, w)  # the search restores the weights


def test_clip_never_increases_error_and_bounds_thresholds():
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(24, 200, generator=gen)
    w[:, 5] *= 8  # outliers make clipping worthwhile
    x = torch.randn(300, 200, generator=gen)
    scheme = QuantScheme(bits=3, group_size=64, include_zero=False)  # partial last group (200 = 3 x 64 + 8)
    t, err, err0 = search_clip(w, x, scheme)
    t0 = torch.stack([w[:, j : j + 64].abs().amax(1) for j in range(0, 200, 64)], dim=1)
    assert bool((t <= t0).all()) and bool((err <= err0).all()) and bool((err < err0).any())
    clipped = apply_clip(w, t, 64)
    assert bool((clipped.abs() <= t.repeat_interleave(64, 1)[:, :200] + 1e-7).all())


def test_clip_leaves_q_and_k_untouched_and_is_deterministic(tiny_model):
    ids = calibration_ids()
    models = [copy.deepcopy(tiny_model) for _ in range(3)]
    opts = [AWQOptions(clip=False), AWQOptions(), AWQOptions()]
    metrics = []
    for model, opt in zip(models, opts, strict=True):
        m = run_block_stages(
            model, arch_for(model), [AWQ(opt, SCHEME)], SCHEME, ids, EngineOptions(progress=False), 0
        ).metrics
        metrics.append(m)
    arch = arch_for(tiny_model)
    for index in range(2):
        blocks = [arch.linears(arch.blocks(m)[index]) for m in models]
        for name in blocks[0]:
            assert torch.equal(blocks[1][name].weight, blocks[2][name].weight)  # deterministic
            untouched = torch.equal(blocks[0][name].weight, blocks[1][name].weight)
            if "q_proj" in name or "k_proj" in name:
                assert untouched
        for info in metrics[1][index]["awq_clip"].values():
            assert info["err"] <= info["err_unclipped"]
        assert not any(k in metrics[1][index]["awq_clip"] for k in ("self_attn.q_proj", "self_attn.k_proj"))


def quantize_tiny(model_dir, text_file, recipe, awq_options=None):
    """lowbit.quantize on the tiny Llama with a tiny calibration set (4 x 32 tokens, w3g32)."""
    from lowbit.models import load_model

    return lowbit.quantize(
        load_model(str(model_dir)),
        recipe=recipe,
        scheme="w3g32",
        dataset=str(text_file),
        nsamples=4,
        seqlen=32,
        options={"awq": awq_options or {}, "engine": {"progress": False}},
    )


@pytest.mark.parametrize("recipe", ["awq+rtn", "awq+gptq"])
def test_awq_recipes_run_and_are_deterministic(tiny_llama_dir, text_file, recipe):
    results = [quantize_tiny(tiny_llama_dir, text_file, recipe) for _ in range(2)]
    assert len(results[0].weights) == 14
    for name, record in results[0].weights.items():
        record.validate()
        assert torch.equal(record.codes, results[1].weights[name].codes)


def test_awq_scales_and_clips_are_saved_with_the_export(tiny_llama_dir, text_file, tmp_path):
    """awq.md §8: the scales (with their linears in the run record) and clips land in the output directory."""
    import json

    from lowbit.export import read_artifacts
    from lowbit.formats.files import RECORD_FILE

    result = quantize_tiny(tiny_llama_dir, text_file, "awq+rtn")
    out = result.save(tmp_path / "out")
    saved = read_artifacts(out)
    assert set(saved) == set(result.artifacts) and saved
    block = "model.layers.0"
    scale = saved[f"awq.scale.{block}.post_attention_layernorm"]
    assert scale.shape == (result.model.config.hidden_size,) and bool((scale > 0).all())
    clip = saved[f"awq.clip.{block}.mlp.down_proj"]
    down = result.model.get_submodule(f"{block}.mlp.down_proj")
    assert clip.shape == (down.out_features, down.in_features // 32)
    assert not any(".q_proj" in name or ".k_proj" in name for name in saved if name.startswith("awq.clip"))
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["artifacts"]["tensors"] == len(saved)
    stage_metrics = record["stages"]
    assert "post_attention_layernorm" in json.dumps(stage_metrics) and "gate_proj" in json.dumps(stage_metrics)
    assert read_artifacts(tmp_path) == {}


def test_awq_can_search_on_the_student_chain(tiny_llama_dir, text_file):
    """search_inputs=student: block 0 sees the same inputs either way (same scales); the run stays valid."""
    runs = [quantize_tiny(tiny_llama_dir, text_file, "awq+gptq", {"search_inputs": x}) for x in ("float", "student")]
    float_run, student_run = runs
    assert student_run.record["config"]["options"]["awq"]["search_inputs"] == "student"
    first = "awq.scale.model.layers.0.input_layernorm"
    torch.testing.assert_close(float_run.artifacts[first], student_run.artifacts[first], rtol=0, atol=0)

    def search_loss(run, block):
        return run.record["stages"]["awq+gptq"][block]["awq_scale"]["post_attention_layernorm"]["loss_r0"]

    assert search_loss(float_run, 0) == search_loss(student_run, 0)
    assert search_loss(float_run, 1) != search_loss(student_run, 1)  # block 1 saw the quantized block 0's outputs
    for record in student_run.weights.values():
        record.validate()


def test_awq_student_preset_expands_to_student_chain_without_clip():
    from lowbit.config import build_config

    config = build_config(recipe="awq-student+gptq", scheme="w3g64", options={"awq": {"clip": True}})
    assert config.recipe == "awq+gptq"
    options = config.to_dict()["options"]["awq"]
    assert options["search_inputs"] == "student" and options["clip"] is True  # explicit options win over the preset
    assert build_config(recipe="awq+gptq", scheme="w3g64").to_dict()["options"]["awq"]["search_inputs"] == "student"
    assert build_config(recipe="awq+gptq", scheme="w3g64").to_dict()["options"]["awq"]["clip"] is True


def test_awq_needs_the_float_chain_only_when_it_searches_on_it():
    scheme = parse_scheme("w3g64")
    assert AWQ(AWQOptions(search_inputs="float"), scheme).uses_float_chain
    assert not AWQ(AWQOptions(), scheme).uses_float_chain  # the default searches on the quantized chain


def test_gram_loss_equals_the_replayed_loss_and_picks_the_same_scales(tiny_model):
    """v->o and up->down: tr(E H E^T) / (tokens * m) is the replayed mean squared output error (awq linear_loss)."""
    ids = calibration_ids()
    results = {}
    for mode in ("gram", "replay"):
        model = copy.deepcopy(tiny_model)
        stage = AWQ(AWQOptions(clip=False, linear_loss=mode), SCHEME)
        found = run_block_stages(model, arch_for(model), [stage], SCHEME, ids, EngineOptions(progress=False), seed=0)
        results[mode] = (found.metrics, model.state_dict())
    for gram_block, replay_block in zip(results["gram"][0], results["replay"][0], strict=True):
        for prev, info in gram_block["awq_scale"].items():
            other = replay_block["awq_scale"][prev]
            assert info["ratio"] == other["ratio"]
            assert info["loss"] == pytest.approx(other["loss"], rel=1e-4)
    arch = arch_for(tiny_model)
    assert sum(g.linears == (g.inspect,) for g in arch.groups_for(arch.blocks(tiny_model)[0])) >= 1  # gram ran
    for key, tensor in results["gram"][1].items():
        assert torch.equal(tensor, results["replay"][1][key]), key


# --- search_samples: the attention/MLP replay searches on evenly spaced whole samples (issue 16) ---------------


def run_awq(model, options):
    stage = AWQ(options, SCHEME)
    found = run_block_stages(
        model, arch_for(model), [stage], SCHEME, calibration_ids(), EngineOptions(progress=False), seed=0
    )
    return stage, found.metrics


@pytest.mark.parametrize("count", [8, 100])
def test_search_samples_covering_every_sample_equals_the_full_search(tiny_model, count):
    reference = copy.deepcopy(tiny_model)
    ref_stage, ref_metrics = run_awq(reference, AWQOptions(clip=False, search_samples=None))
    stage, metrics = run_awq(tiny_model, AWQOptions(clip=False, search_samples=count))
    for block, ref_block in zip(metrics, ref_metrics, strict=True):
        assert block["awq_scale"] == ref_block["awq_scale"]  # ratios, losses (bit for bit), samples
        assert {info["search_samples"] for info in block["awq_scale"].values()} == {8}
    assert ref_stage.artifacts().keys() == stage.artifacts().keys()
    for name, scale in stage.artifacts().items():
        assert torch.equal(scale, ref_stage.artifacts()[name]), name


def test_spaced_samples_and_replay_samples():
    from lowbit.methods.awq.stage import replay_samples, spaced_samples

    assert spaced_samples(8, None) is None and spaced_samples(8, 8) is None and spaced_samples(8, 9) is None
    assert spaced_samples(128, 8).tolist() == [0, 18, 36, 54, 73, 91, 109, 127]
    assert spaced_samples(10, 1).tolist() == [0] and spaced_samples(10, 4).tolist() == [0, 3, 6, 9]
    x = torch.arange(10 * 3 * 2, dtype=torch.float32).reshape(10, 3, 2)
    picked = torch.tensor([0, 3, 6, 9])
    sub, used = replay_samples(x, 10, 4, None)
    assert used == 4 and torch.equal(sub, x[picked])
    broadcast = (False, (), {"position_embeddings": (torch.ones(1, 3, 4), torch.ones(1, 3, 4)), "mask": None})
    assert torch.equal(replay_samples(x, None, 4, broadcast)[0], x[picked])
    flat, used = replay_samples(x.reshape(30, 2), 10, 4, (True, (), {}))  # OPT's FFN: [tokens, k]
    assert used == 4 and torch.equal(flat, x[picked].reshape(12, 2))
    unknown, used = replay_samples(x.reshape(30, 2), None, 4, None)
    assert used is None and unknown.shape == (30, 2)  # no sample structure: every row
    batched = (False, (), {"mask": torch.zeros(2, 1, 3, 3)})  # batch-shaped call arguments: a subset cannot match
    kept, used = replay_samples(x, 10, 4, batched)
    assert used == 10 and torch.equal(kept, x)


def test_search_samples_replays_only_the_evenly_spaced_samples():
    """The MLP group on 10 samples with search_samples=4: y0 and every grid point replay exactly samples 0, 3, 6, 9;
    the candidates' x̄ covers all 10; losses and the chosen ratio are recomputed here on those 4."""
    from conftest import make_llama
    from lowbit.engine import BlockContext

    model = make_llama()
    arch = arch_for(model)
    block = arch.blocks(model)[0]
    group = next(g for g in arch.scale_groups if g.prev == "post_attention_layernorm")
    mlp = block.get_submodule(group.inspect)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(10, 16, 64, generator=gen) * (torch.rand(64, generator=gen) * 4)
    x[4:6] *= 6  # samples 4 and 5 are left out and dominate the full loss
    picked = torch.tensor([0, 3, 6, 9])
    ctx = BlockContext(0, "b", block, arch, SCHEME, {}, torch.device("cpu"), 3, 0)
    stage = AWQ(AWQOptions(search_samples=4), SCHEME)
    seen = []
    handle = mlp.register_forward_pre_hook(lambda _module, args: seen.append(args[0].clone()))
    try:
        s, info = stage.search_scale(ctx, group, x, None, 10)
    finally:
        handle.remove()
    assert len(seen) == 21 * 2  # y0 + 20 grid points, each 4 samples in batches of 3 and 1
    for i in range(0, len(seen), 2):
        assert torch.equal(torch.cat(seen[i : i + 2]), x[picked])

    weights = {name: block.get_submodule(name).weight.detach().clone() for name in group.linears}
    xbar = x.reshape(-1, 64).abs().mean(0)
    losses = []
    with torch.no_grad():
        y0 = mlp(x[picked])
        for i in range(20):
            si = normalised_scales(xbar, i / 20)
            for name, w in weights.items():
                block.get_submodule(name).weight.copy_(fake_quant(w * si, stage.search_scheme) / si)
            losses.append(float((mlp(x[picked]) - y0).double().square().mean()))
        for name, w in weights.items():
            block.get_submodule(name).weight.copy_(w)
    best = min(range(20), key=lambda i: losses[i])
    assert info["search_samples"] == 4 and info["ratio"] == best / 20
    assert info["loss"] == pytest.approx(losses[best], rel=1e-4)
    assert info["loss_r0"] == pytest.approx(losses[0], rel=1e-4)
    torch.testing.assert_close(s, normalised_scales(xbar, best / 20))  # x̄ over every sample
    full = AWQ(AWQOptions(search_samples=None), SCHEME).search_scale(ctx, group, x, None, 10)[1]
    assert full["search_samples"] == 10 and full["loss_r0"] > 2 * info["loss_r0"]  # the subset changed the loss


class _CountingAWQ(AWQ):
    """AWQ that counts the tokens each inspected module replays in the search (`_call` serves only the search)."""

    def __init__(self, options, scheme):
        super().__init__(options, scheme)
        self.tokens: dict[tuple[int, str], int] = {}

    def _call(self, ctx, module, call, x):
        name = next(n for n, m in ctx.block.named_modules() if m is module)
        self.tokens[ctx.index, name] = self.tokens.get((ctx.index, name), 0) + x.shape[:-1].numel()
        return super()._call(ctx, module, call, x)


@pytest.mark.parametrize("linear_loss", ["gram", "replay"])
def test_search_samples_in_the_block_loop_and_the_run_record(tiny_model, linear_loss):
    """3 of 8 samples: attention (its rotary/mask call arguments broadcast over the subset) and MLP replay only
    those, as do the linear-only groups under linear_loss=replay (OPT's fc1/fc2 inputs are flattened [tokens, k]);
    the Gram groups cover all 8. The block metrics record the count."""
    stage = _CountingAWQ(AWQOptions(clip=False, n_grid=4, search_samples=3, linear_loss=linear_loss), SCHEME)
    metrics = run_block_stages(
        tiny_model, arch_for(tiny_model), [stage], SCHEME, calibration_ids(), EngineOptions(progress=False), seed=0
    ).metrics
    arch = arch_for(tiny_model)
    for block in metrics:
        groups = arch.groups_for(arch.blocks(tiny_model)[block["block"]])
        assert len(groups) == 4
        for group in groups:
            gram = linear_loss == "gram" and group.linears == (group.inspect,)
            assert block["awq_scale"][group.prev]["search_samples"] == (8 if gram else 3), group.prev
            assert stage.tokens.get((block["block"], group.inspect), 0) == (0 if gram else 5 * 3 * 32), group.prev


@pytest.mark.parametrize("value", [0, -3])
def test_search_samples_must_be_positive(value):
    from lowbit.config import build_config
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match=r"awq\.search_samples must be a positive"):
        AWQ(AWQOptions(search_samples=value), SCHEME)
    with pytest.raises(LowbitError, match=r"awq\.search_samples"):
        build_config(recipe="awq+rtn", scheme="w3g64", options={"awq": {"search_samples": str(value)}})
    options = {"awq": {"search_samples": "16"}}
    assert build_config(recipe="awq+rtn", scheme="w3g64", options=options).to_dict()["options"]["awq"] == {
        **build_config(recipe="awq+rtn", scheme="w3g64").to_dict()["options"]["awq"],
        "search_samples": 16,
    }


# --- the engine's float-target forward doubles as AWQ's feature pass (issue 16) ---------------------------------


class CountingAWQ(AWQ):
    """AWQ that counts its own block forwards (`group_inputs`); `observe=False` refuses the engine's offer."""

    def __init__(self, options, scheme, observe=True):
        super().__init__(options, scheme)
        self.observe, self.own_passes = observe, 0

    def observe_targets(self, ctx):
        return super().observe_targets(ctx) if self.observe else contextlib.nullcontext()

    def group_inputs(self, ctx, inputs):
        self.own_passes += 1
        return super().group_inputs(ctx, inputs)


class ScaleWeights(BlockStage):
    """A transform that changes every weight of the block before AWQ runs (as a preceding stage might)."""

    name, kind, needs_data, summary = "scale-weights", "transform", True, "test only"

    def process_block(self, ctx):
        with torch.no_grad():
            for linear in ctx.linears().values():
                linear.weight.mul_(1.01)


@pytest.mark.parametrize("search_inputs", ["float", "student"])
def test_awq_records_its_features_in_the_engines_target_forward(tiny_model, search_inputs):
    found, stages = {}, {}
    for observe in (True, False):
        model = copy.deepcopy(tiny_model)
        stages[observe] = CountingAWQ(AWQOptions(search_inputs=search_inputs), SCHEME, observe=observe)
        run = run_block_stages(model, arch_for(model), [stages[observe]], SCHEME, calibration_ids(),
                               EngineOptions(progress=False), seed=0)  # fmt: skip
        found[observe] = ([m["awq_scale"] for m in run.metrics], model.state_dict())
    blocks = len(arch_for(tiny_model).blocks(tiny_model))
    assert stages[False].own_passes == blocks
    assert stages[True].own_passes == (0 if search_inputs == "float" else blocks)
    assert found[True][0] == found[False][0]
    for key, tensor in found[True][1].items():
        assert torch.equal(tensor, found[False][1][key]), key


def test_awq_runs_its_own_pass_when_an_earlier_stage_changed_the_block(tiny_model):
    awq = CountingAWQ(AWQOptions(), SCHEME)
    model = copy.deepcopy(tiny_model)
    run_block_stages(model, arch_for(model), [ScaleWeights(None, SCHEME), awq], SCHEME, calibration_ids(),
                     EngineOptions(progress=False), seed=0)  # fmt: skip
    assert awq.own_passes == len(arch_for(tiny_model).blocks(tiny_model))
