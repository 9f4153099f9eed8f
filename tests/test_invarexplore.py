"""InvarExplore (spec invarexplore.md §11): invariances, incremental == naive, fold, record, resume, bad input."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import lowbit
from lowbit.arch import arch_for
from lowbit.cli import main
from lowbit.config import build_config
from lowbit.data import load_calibration
from lowbit.errors import LowbitError
from lowbit.export import read_artifacts
from lowbit.formats.files import RECORD_FILE
from lowbit.methods.invarexplore.invariances import (
    LayerState,
    ProposalConfig,
    build_candidate,
    changed_positions,
    dense_transform,
    fold_weights,
    group_columns,
    monitored_layers,
    neuron_roles,
    propose,
    quantize_rows,
    transformed_columns,
    transformed_rows,
)
from lowbit.methods.invarexplore.search import InvarSearch
from lowbit.methods.invarexplore.stage import InvarExploreOptions
from lowbit.quantizer import quantize_weight
from lowbit.scheme import parse_scheme

SCHEME = parse_scheme("w2g32")
IDS = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(1))


def make(family: str, layers: int = 4, seed: int = 0):
    """Tiny 4-layer models (hidden 64, FFN 256) of each family."""
    torch.manual_seed(seed)
    if family == "llama":
        config = LlamaConfig(
            vocab_size=320, hidden_size=64, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        )  # fmt: skip
        return LlamaForCausalLM(config).eval()
    config = OPTConfig(
        vocab_size=320, hidden_size=64, ffn_dim=256, num_hidden_layers=layers, num_attention_heads=4,
        word_embed_proj_dim=64, max_position_embeddings=128, enable_bias=True,
    )  # fmt: skip
    return OPTForCausalLM(config).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def relative(a, b):
    return float((a - b).norm() / b.norm())


def random_state(n, generator, *, perm=True, scale=None, angle=None):
    state = LayerState.identity(n)
    if perm:
        state.perm = torch.randperm(n, generator=generator)
    if scale is not None:
        state.scale = torch.empty(n).uniform_(*scale, generator=generator)
    if angle is not None:
        state.angle = torch.randn(n // 2, generator=generator) * angle
    return state


def apply_states(model, states, rotation_target="up_down"):
    """Fold one state per layer into the float model (the stage's fold, without a search)."""
    arch = arch_for(model)
    roles = neuron_roles(arch.ffn, rotation_target)
    for block, state in zip(arch.blocks(model), states, strict=True):
        linears = arch.linears(block)
        teacher = {name: linears[name].weight.detach().clone() for name in roles.linears}
        biases = {n: linears[n].bias.detach().clone() for n, _, _ in roles.expand if linears[n].bias is not None}
        weights, new_biases = fold_weights(teacher, biases, state, roles)
        for name, w in weights.items():
            linears[name].weight.data = w
        for name, b in new_biases.items():
            linears[name].bias.data = b


FAMILIES = ["llama", "opt"]


# --- invariances (§2, §4, §5) -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_permutation_and_scaling_are_exact(family):
    model = make(family)
    reference = logits(model)
    g = torch.Generator().manual_seed(3)
    scale = (0.5, 2.0) if family == "opt" else (-2.0, 2.0)  # SwiGLU's up branch is linear: any s != 0
    states = [random_state(256, g, scale=scale) for _ in range(4)]
    for state in states:
        state.scale[state.scale.abs() < 0.1] = 0.5
    apply_states(model, states)
    assert relative(logits(model), reference) < 1e-5


def test_scaling_llama_gate_is_not_invariant():
    model = make("llama")
    reference = logits(model)
    arch = arch_for(model)
    s = torch.empty(256).uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(4))
    for block in arch.blocks(model):
        block.mlp.gate_proj.weight.data /= s[:, None]
        block.mlp.down_proj.weight.data *= s[None, :]
    assert relative(logits(model), reference) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_rotation_is_near_invariant_and_first_order_in_the_angle(family):
    reference = logits(make(family))
    changes = []
    for sigma in (1e-3, 5e-4):
        model = make(family)
        g = torch.Generator().manual_seed(5)
        apply_states(model, [random_state(256, g, perm=False, angle=sigma) for _ in range(4)])
        changes.append(relative(logits(model), reference))
    assert 0 < changes[0] < 5e-3  # first order: about the angle's size (1e-3) times an O(1) factor
    assert 0.35 < changes[1] / changes[0] < 0.65


def test_elementwise_rotation_matches_the_dense_construction():
    g = torch.Generator().manual_seed(6)
    up, down = torch.randn(256, 64, generator=g), torch.randn(64, 256, generator=g)
    state = random_state(256, g, scale=(0.5, 2.0), angle=0.3)
    everything = torch.arange(256)
    dense_up, dense_down = dense_transform(up, down, state)
    up2 = transformed_rows(up, state, everything, scaled=True, rotated=True)
    down2 = transformed_columns(down, state, everything)
    assert relative(up2.double(), dense_up) < 1e-6
    assert relative(down2.double(), dense_down) < 1e-6
    assert torch.allclose((down2 @ up2).double(), down.double() @ up.double(), rtol=1e-4, atol=1e-4)
    identity = LayerState.identity(256)
    assert torch.equal(transformed_rows(up, identity, everything, scaled=True, rotated=True), up)
    assert torch.equal(transformed_columns(down, identity, everything), down)


# --- proposals, rows, groups --------------------------------------------------------------------------------


def test_proposal_follows_the_reference_distribution():
    state = random_state(256, torch.Generator().manual_seed(7))
    new, touched = propose(state, torch.Generator().manual_seed(8), ProposalConfig())
    assert touched.numel() == 26 and set(touched.tolist()) == {i ^ 1 for i in touched.tolist()}  # whole pairs
    assert torch.equal(torch.sort(new.perm).values, torch.arange(256))
    moved = (new.perm != state.perm).nonzero().flatten()
    assert set(moved.tolist()) == set(touched.tolist())  # one cycle over T moves every position of T
    assert set(new.perm[touched].tolist()) == set(state.perm[touched].tolist())
    assert ((new.scale != state.scale).nonzero().flatten().sort().values == touched.sort().values).all()
    assert int((new.angle != state.angle).sum()) == 13
    frozen, _ = propose(state, torch.Generator().manual_seed(8), ProposalConfig(permute=False, rotate=False))
    assert torch.equal(frozen.perm, state.perm) and torch.equal(frozen.angle, state.angle)


def test_changed_positions_and_group_columns():
    perm = torch.tensor([3, 0, 1, 2, 4, 5, 6, 7])
    assert changed_positions(perm, torch.tensor([0, 1])).tolist() == [0, 1, 2]
    assert group_columns(torch.tensor([1, 9]), 20, parse_scheme("w2g8")).tolist() == [*range(0, 8), *range(8, 16)]
    assert group_columns(torch.tensor([17]), 20, parse_scheme("w2g8")).tolist() == [16, 17, 18, 19]
    assert group_columns(torch.tensor([3]), 20, parse_scheme("w2g-1")).tolist() == list(range(20))


@pytest.mark.parametrize("scheme", ["w2g32", "w3g128", "w2g-1", "w2g24"])
def test_row_and_group_requantization_equals_whole_matrix(scheme):
    scheme = parse_scheme(scheme)
    g = torch.Generator().manual_seed(9)
    w = torch.randn(40, 100, generator=g)
    whole = quantize_rows(w, scheme, torch.float32)
    rows = torch.tensor([0, 7, 8, 39])
    assert torch.equal(quantize_rows(w[rows], scheme, torch.float32), whole[rows])
    cols = group_columns(torch.tensor([5, 99]), 100, scheme)
    assert torch.equal(quantize_rows(w[:, cols], scheme, torch.float32), whole[:, cols])
    assert torch.equal(whole, quantize_weight(w, scheme).dequantize())


def test_changed_rows_match_a_full_rebuild_over_a_scripted_sequence():
    model = make("opt")
    arch = arch_for(model)
    roles = neuron_roles(arch.ffn)
    linears = arch.linears(arch.blocks(model)[0])
    teacher = {name: linears[name].weight.detach().clone() for name in roles.linears}
    teacher_bias = {"fc1": linears["fc1"].bias.detach().clone()}

    def quantize(w):
        return quantize_rows(w, SCHEME, torch.float32)

    state = LayerState.identity(256)
    current, current_bias = build_candidate(teacher, teacher_bias, {}, {}, state, None, roles, quantize, SCHEME)
    config = ProposalConfig(swap_frac=0.05, sigma_scale=0.1, sigma_rot=0.1)
    for step in range(12):
        state, touched = propose(state, torch.Generator().manual_seed(step), config)
        fast = build_candidate(teacher, teacher_bias, current, current_bias, state, touched, roles, quantize, SCHEME)
        full = build_candidate(teacher, teacher_bias, {}, {}, state, None, roles, quantize, SCHEME)
        for name in fast[0]:
            assert torch.equal(fast[0][name], full[0][name]), (step, name)
        assert torch.equal(fast[1]["fc1"], full[1]["fc1"])
        current, current_bias = fast


def test_monitored_layers_match_the_reference():
    assert monitored_layers(24, 10) == sorted([23, 20, 18, 15, 13, 11, 8, 6, 3, 1])
    assert monitored_layers(40, 10) == list(range(3, 40, 4))
    assert monitored_layers(4, 4) == [0, 1, 2, 3] and monitored_layers(4, 0) == []
    with pytest.raises(LowbitError, match="monitored_layers=5 exceeds the model's 4"):
        monitored_layers(4, 5)


# --- the search: incremental == naive, reject, rebuild, fold ----------------------------------------------


def options(**overrides):
    values = {"samples": 4, "monitored_layers": 3, "batch_size": 2, "ce_chunk": 40, "progress": False, "log_every": 5}
    return InvarExploreOptions(**(values | overrides))


def new_search(family, **overrides):
    model = make(family)
    search = InvarSearch(model, arch_for(model), SCHEME, IDS, options(**overrides), seed=0, device="cpu")
    search.prepare()
    return search


@pytest.mark.parametrize("family", FAMILIES)
def test_incremental_and_naive_take_the_same_decisions(family):
    fast, naive = new_search(family), new_search(family, evaluation="naive")
    assert fast.best == naive.best == pytest.approx(1.1)
    decisions = []
    for step in range(30):
        a, b = fast.step(step), naive.step(step)
        assert a == b, step
        assert fast.best == pytest.approx(naive.best, rel=1e-6)
        decisions.append(a[1])
    assert 0 < sum(decisions) < 30
    for x, y in zip(fast.states, naive.states, strict=True):
        assert torch.equal(x.perm, y.perm) and torch.equal(x.scale, y.scale) and torch.equal(x.angle, y.angle)


@pytest.mark.parametrize("family", FAMILIES)
def test_incremental_loss_matches_a_full_forward_and_a_reject_restores_the_student(family):
    search = new_search(family)
    for step in range(12):
        before = [{k: v.clone() for k, v in search.student(layer)[0].items()} for layer in range(4)]
        accepts = search.counters.accepts
        layer, accepted = search.step(step)
        incremental = search.evaluator.current
        value = search.objective(incremental)
        assert search.objective(search.evaluator.naive()) == pytest.approx(value, rel=1e-5)
        if not accepted:
            for name, w in search.student(layer)[0].items():
                assert torch.equal(w, before[layer][name])
        assert search.counters.accepts == accepts  # counters belong to run(); step() only decides
    # the cached streams still give the same loss as a fresh block-wise pass
    cached = search.objective(search.evaluator.current)
    assert search.objective(search.evaluator.full()) == pytest.approx(cached, rel=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_rebuilding_from_the_states_reproduces_the_student_and_the_fold_feeds_rtn(family):
    search = new_search(family, sigma_rot=1e-2, sigma_scale=0.05, max_steps=15)
    search.run()
    arch = search.arch
    students = [{k: v.weight.detach().clone() for k, v in arch.linears(b).items()} for b in arch.blocks(search.model)]
    for layer, state in enumerate(search.states):
        rebuilt, _ = search._candidate(layer, state, None)
        for name, w in rebuilt.items():
            assert torch.equal(w, students[layer][name])
    assert search.fold() == 0
    for layer, block in enumerate(arch.blocks(search.model)):
        for name, linear in arch.linears(block).items():  # every linear, attention included
            assert torch.equal(quantize_weight(linear.weight.detach(), SCHEME).dequantize(), students[layer][name])


def test_same_seed_and_budget_give_the_same_run():
    runs = []
    for _ in range(2):
        search = new_search("llama", max_steps=15)
        search.run()
        runs.append(search)
    a, b = runs
    assert a.counters.accepts_per_layer == b.counters.accepts_per_layer and a.best == b.best
    assert all(
        torch.equal(x.scale, y.scale) and torch.equal(x.perm, y.perm) for x, y in zip(a.states, b.states, strict=True)
    )


def test_checkpoint_file_resumes_to_the_straight_run(tmp_path):
    straight = new_search("opt", max_steps=12)
    straight.run()
    path = tmp_path / "record.safetensors"
    first = new_search("opt", max_steps=6, checkpoint=str(path))
    first.run()
    model = make("opt")
    second = InvarSearch(model, arch_for(model), SCHEME, IDS, options(max_steps=12), seed=0, device="cpu")
    states, start, accepts = second.load_record(path)
    assert start == 6 and accepts == first.counters.accepts
    second.prepare(states)
    assert second.best == pytest.approx(first.best, rel=1e-6)
    second.counters.accepts = accepts
    second.run(start)
    assert second.counters.accepts == straight.counters.accepts
    assert all(torch.equal(x.perm, y.perm) for x, y in zip(second.states, straight.states, strict=True))
    other = make("llama")
    stranger = InvarSearch(other, arch_for(other), SCHEME, IDS, options(), seed=0, device="cpu")
    with pytest.raises(LowbitError, match="no state for model.layers.0"):
        stranger.load_record(path)
    with pytest.raises(LowbitError, match="no invariance record"):
        stranger.load_record(tmp_path / "missing")


def test_time_budget_and_default_batch():
    search = new_search("llama", max_steps=10_000, max_seconds=0.2)
    assert search.run() == "max_seconds" and 0 < search.counters.steps < 10_000
    assert InvarExploreOptions().samples == 32 and build_config(recipe="awq+invarexplore+rtn").seqlen == 512


def test_guard_patience_and_ablation_switches():
    search = new_search("opt", max_steps=20, sigma_scale=2.0)
    search.run()
    assert search.counters.guard_rejects > 0
    assert all(bool((state.scale > 0.05).all()) for state in search.states)
    search = new_search("opt", max_steps=50, patience=2)
    assert search.run() == "patience" and search.counters.steps < 50
    search = new_search("llama", max_steps=10, permute=False, rotate=False)
    search.run()
    assert all(torch.equal(s.perm, torch.arange(256)) and bool((s.angle == 0).all()) for s in search.states)


# --- the stage through the pipeline: export, record, resume, errors -----------------------------------------


def quantize(model_dir, text_file, recipe="invarexplore+rtn", **stage):
    values = {"samples": 4, "monitored_layers": 2, "progress": False, "log_every": 4, "batch_size": 2} | stage
    return lowbit.quantize(
        str(model_dir), recipe=recipe, scheme="w2g32", dataset=str(text_file), nsamples=4, seqlen=32,
        seed=3, options={"invarexplore": values, "engine": {"progress": False}},
    )  # fmt: skip


def test_export_equals_the_in_loop_student_and_resume_replays(tiny_llama_dir, text_file, tmp_path):
    straight = quantize(tiny_llama_dir, text_file, max_steps=12)
    metrics = straight.record["stages"]["invarexplore"]
    assert metrics["fold_check"] == "bit-identical" and metrics["steps"] == 12
    assert metrics["final_objective"] <= metrics["initial_objective"]
    assert [row["step"] for row in metrics["log"]] == [4, 8, 12]
    out = straight.save(tmp_path / "straight", format="fake")
    record = read_artifacts(out)
    assert (
        int(record["invarexplore.steps"][0]) == 12
        and record["invarexplore.scale.model.layers.0"].dtype == torch.float32
    )

    # the exported model's calibration CE is the in-loop student's final CE
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    config = json.loads((out / RECORD_FILE).read_text())
    assert config["stages"]["invarexplore"]["windows"] == [4, 32]
    ids = load_calibration(straight.tokenizer, str(text_file), nsamples=4, seqlen=32, seed=3).input_ids
    with torch.no_grad():
        ce = reloaded(input_ids=ids, labels=ids).loss.item()
    assert ce == pytest.approx(metrics["final_ce"], rel=1e-5)

    half = quantize(tiny_llama_dir, text_file, max_steps=6)
    half.save(tmp_path / "half", format="fake")
    resumed = quantize(tiny_llama_dir, text_file, max_steps=12, resume=str(tmp_path / "half"))
    again = resumed.record["stages"]["invarexplore"]
    assert again["start_step"] == 6 and again["steps"] == 12 and again["accepts"] == metrics["accepts"]
    assert again["final_objective"] == pytest.approx(metrics["final_objective"], rel=1e-6)
    for name, tensor in straight.artifacts.items():
        assert torch.equal(resumed.artifacts[name], tensor), name


def test_awq_invarexplore_rtn_on_opt(tiny_opt_dir, text_file):
    result = quantize(tiny_opt_dir, text_file, recipe="awq+invarexplore+rtn", max_steps=5)
    metrics = result.record["stages"]["invarexplore"]
    assert metrics["steps"] == 5 and metrics["fold_check"] == "bit-identical"
    assert set(metrics["time_breakdown_s"]) >= {"blocks", "head", "build"}
    assert "invarexplore.perm.model.decoder.layers.1" in result.artifacts and "awq.scale" in " ".join(result.artifacts)
    assert len(result.weights) == 12


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ("invarexplore+awq+rtn", "put invarexplore last"),
        ("awq+invarexplore", "ends with invarexplore"),
        ("invarexplore+invarexplore+rtn", "twice"),
    ],
)
def test_bad_recipes_are_refused_at_config_time(recipe, message):
    with pytest.raises(LowbitError, match=message):
        build_config(recipe=recipe)


def test_options_reach_the_stage_and_bad_values_are_refused():
    config = build_config(recipe="invarexplore+gptq", options={"invarexplore": {"permute": "false", "max_steps": "7"}})
    assert config.stages[0].options.permute is False and config.stages[0].options.max_steps == 7
    for bad, message in [({"max_steps": 0}, "max_steps=0"), ({"permute": False, "scale": False, "rotate": False},
                         "nothing to search"), ({"proxy": "gptq_exact"}, "must be one of rtn")]:  # fmt: skip
        with pytest.raises(LowbitError, match=message):
            build_config(recipe="invarexplore+rtn", options={"invarexplore": bad})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--recipe", "invarexplore+awq+rtn"], "put invarexplore last"),
        (["--recipe", "invarexplore+rtn", "--opt", "invarexplore.max_steps=0"], "max_steps=0"),
        (["--recipe", "invarexplore+rtn", "--opt", "invarexplore.monitored_layers=5"], "monitored_layers=5 exceeds"),
    ],
)
def test_cli_bad_input_gives_one_error_and_no_output(tiny_llama_dir, text_file, tmp_path, capsys, args, message):
    out = tmp_path / "never"
    code = main([
        "quantize", str(tiny_llama_dir), *args, "--scheme", "w2g32", "--dataset", str(text_file), "--nsamples", "4",
        "--seqlen", "32", "--opt", "invarexplore.samples=4", "--opt", "engine.progress=false", "--out", str(out),
    ])  # fmt: skip
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]
