"""Budgeted mixed precision (issue 34): `auto:` schemes, stored sizes, the exact knapsack, plans and their reruns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lowbit.arch import arch_for
from lowbit.errors import LowbitError
from lowbit.mixed.knapsack import brute_force, solve
from lowbit.mixed.plan import PLAN_FILE
from lowbit.scheme import DEFAULT_AUTO_OPTIONS, QuantScheme, parse_scheme


def test_auto_scheme_parses_budget_and_options_once():
    scheme = parse_scheme("auto:3.0:w2g64,w3g128,w4g128,w8g-1")
    assert scheme.name == "auto:3.0:w2g64,w3g128,w4g128,w8g-1"
    assert (scheme.bits, scheme.group_size) == (8, -1)  # the widest option
    assert scheme.mixed.bits == 3.0
    assert [o.name for o in scheme.mixed.options] == ["w2g64", "w3g128", "w4g128", "w8g-1"]
    assert QuantScheme.from_dict(scheme.to_dict()) == scheme
    assert [o.name for o in parse_scheme("auto:2.5").mixed.options] == list(DEFAULT_AUTO_OPTIONS)
    assert "auto" not in parse_scheme("w4g128").to_dict()  # other schemes' records stay as they were


@pytest.mark.parametrize("text", ["auto:x", "auto:0", "auto:-1", "auto:3:w4a4", "auto:3:gguf:q4_0", "auto:3:w9g1"])
def test_bad_auto_schemes_name_the_fix(text):
    with pytest.raises(LowbitError):
        parse_scheme(text)


def test_knapsack_matches_brute_force_on_small_cases():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n, m = int(rng.integers(1, 6)), int(rng.integers(1, 4))
        costs = rng.integers(0, 20, (n, m)).tolist()
        losses = rng.random((n, m)).round(2).tolist()
        capacity = int(rng.integers(0, 60))
        found, best = solve(costs, losses, capacity), brute_force(costs, losses, capacity)
        if best is None:
            assert found is None
            continue
        assert sum(costs[i][j] for i, j in enumerate(found)) <= capacity
        assert sum(losses[i][j] for i, j in enumerate(found)) == pytest.approx(best[0], abs=1e-12)


def _dense_dp(costs, losses, capacity) -> float:
    """The least loss by a plain DP over every capacity (the textbook multiple-choice knapsack)."""
    best = np.zeros(capacity + 1)
    for row_c, row_l in zip(costs, losses, strict=True):
        new = np.full(capacity + 1, np.inf)
        for c, v in zip(row_c, row_l, strict=True):
            new[c:] = np.minimum(new[c:], best[: capacity + 1 - c] + v)
        best = new
    return float(best.min())


def test_knapsack_matches_a_dense_dp_on_medium_cases():
    """40 items x 4 options: the bounds prune, the answer stays the exact optimum."""
    rng = np.random.default_rng(1)
    for _ in range(20):
        costs = rng.integers(1, 60, (40, 4)).tolist()
        losses = (rng.random((40, 4)) ** 3).tolist()
        least, most = sum(min(row) for row in costs), sum(max(row) for row in costs)
        capacity = int(rng.integers(least, most + 1))
        found = solve(costs, losses, capacity)
        assert sum(costs[i][j] for i, j in enumerate(found)) <= capacity
        assert sum(losses[i][j] for i, j in enumerate(found)) == pytest.approx(_dense_dp(costs, losses, capacity))


def test_knapsack_is_deterministic_and_prefers_the_cheaper_tie():
    costs, losses = [[1, 2], [1, 2]], [[1.0, 1.0], [2.0, 0.5]]
    assert solve(costs, losses, 4) == (0, 1) == solve(costs, losses, 4)
    assert solve(costs, losses, 1) is None


# --- plans on tiny models ----------------------------------------------------------------------------------------

SYM = "w2g32-sym,w3g32-sym,w4g32-sym,w8g-1-sym"  # symmetric: compressed-tensors MoE experts accept only these
LINEAR_TENSORS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


def _loaded(family: str, tokenizer):
    from conftest import make_llama, make_opt
    from families import make_family
    from lowbit.models import LoadedModel
    from test_moe import make_moe

    builders = {"llama": make_llama, "opt": make_opt, "qwen3_moe": make_moe}
    model = builders[family]() if family in builders else make_family(family)
    return LoadedModel(model, tokenizer, f"tiny-{family}", Path("."))


def _quantize(loaded, scheme, text_file, recipe="rtn", options=None, **kwargs):
    import lowbit

    options = options or {"engine": {"progress": False, "batch_size": 2}}
    return lowbit.quantize(loaded, recipe=recipe, scheme=scheme, dataset=str(text_file), nsamples=4, seqlen=16, seed=0,
                           options=options, **kwargs)  # fmt: skip


def _linear_bytes(directory: Path, names) -> int:
    """Bytes of the planned linears' tensors in a compressed-tensors export, read back from its files."""
    from safetensors import safe_open

    total = 0
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                owner, _, tensor = key.rpartition(".")
                if owner in names and tensor in LINEAR_TENSORS:
                    t = f.get_tensor(key)
                    total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("family", ["llama", "opt", "gemma2", "gemma3", "qwen3", "phi3", "qwen3_moe"])
def test_budget_is_met_as_the_export_stores_it(family, tokenizer, text_file, tmp_path):
    result = _quantize(_loaded(family, tokenizer), f"auto:4.5:{SYM}", text_file)
    plan = result.record["mixed_precision"]
    assert plan["stored_bytes"] <= plan["budget_bytes"] == int(4.5 * plan["weights"] / 8)
    assert plan["bits_per_weight"] <= 4.5
    assert len(set(plan["linears"].values())) > 1  # a real mix, not a uniform fallback
    result.save(tmp_path / "out", format="compressed-tensors", ct_packing="dense")
    assert _linear_bytes(tmp_path / "out", set(plan["linears"])) == plan["stored_bytes"]
    for name, option in plan["linears"].items():
        assert result.weights[name].scheme.name == option  # every linear was rounded at its planned scheme
    saved = yaml.safe_load((tmp_path / "out" / PLAN_FILE).read_text())
    assert saved["linears"] == plan["linears"]


def test_fused_linears_share_a_scheme(tokenizer, text_file):
    plan = _quantize(_loaded("llama", tokenizer), f"auto:4.5:{SYM}", text_file).record["mixed_precision"]["linears"]
    for block in {name.rsplit(".", 2)[0] for name in plan}:
        assert len({plan[f"{block}.self_attn.{p}"] for p in ("q_proj", "k_proj", "v_proj")}) == 1
        assert len({plan[f"{block}.mlp.{p}"] for p in ("gate_proj", "up_proj")}) == 1


def _uniform_bits(loaded, option: str) -> float:
    from lowbit.mixed.plan import uniform_bits

    return uniform_bits(loaded.model, arch_for(loaded.model), parse_scheme(f"auto:8:{SYM}"), "compressed-tensors")[
        option
    ]


@pytest.mark.parametrize("option", ["w2g32-sym", "w8g-1-sym"])
def test_a_uniform_budget_gives_that_scheme(option, tokenizer, text_file):
    """The smallest option's bits leave no room; the widest's buy it everywhere (it has the least loss)."""
    loaded = _loaded("llama", tokenizer)
    bits = _uniform_bits(loaded, option)
    plan = _quantize(loaded, f"auto:{bits!r}:{SYM}", text_file).record["mixed_precision"]
    assert set(plan["linears"].values()) == {option}
    assert plan["bits_per_weight"] == pytest.approx(bits)


@pytest.mark.parametrize("estimator", ["hessian", "gradient", "lm"])
def test_plans_are_deterministic(estimator, tokenizer, text_file):
    first = _quantize(_loaded("llama", tokenizer), f"auto:4.5:{SYM}:{estimator}", text_file)
    again = _quantize(_loaded("llama", tokenizer), f"auto:4.5:{SYM}:{estimator}", text_file)
    assert first.record["mixed_precision"] == again.record["mixed_precision"]
    for name, record in first.weights.items():
        assert torch.equal(record.codes, again.weights[name].codes)


def test_a_saved_plan_reruns_to_the_same_bytes(tiny_llama_dir, text_file, tmp_path):
    import lowbit
    from lowbit.run import ExportSettings

    settings = {"model": str(tiny_llama_dir), "recipe": "gptq", "dataset": str(text_file), "nsamples": 4,
                "seqlen": 16, "seed": 0, "options": {"engine": {"progress": False}},
                "export": ExportSettings(format="compressed-tensors", ct_packing="dense")}  # fmt: skip
    lowbit.quantize_to(tmp_path / "a", scheme=f"auto:4.5:{SYM}", **settings)
    rerun = lowbit.quantize_to(tmp_path / "b", scheme_plan=tmp_path / "a" / PLAN_FILE, **settings)
    assert rerun.record["mixed_precision"]["from_file"] is True
    a, b = sorted((tmp_path / "a").glob("*.safetensors")), sorted((tmp_path / "b").glob("*.safetensors"))
    assert [p.name for p in a] == [p.name for p in b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b, strict=True))
    assert (tmp_path / "a" / PLAN_FILE).read_text() == (tmp_path / "b" / PLAN_FILE).read_text()


def _refused(capsys, tmp_path, monkeypatch, model_dir, *args) -> str:
    from lowbit.cli import main

    def forbidden(*_a, **_k):
        raise AssertionError("calibration loaded before the refusal")

    monkeypatch.setattr("lowbit.quantization.load_calibration", forbidden)
    out = tmp_path / "never"
    code = main(["quantize", str(model_dir), "--recipe", "gptq", *args, "--out", str(out)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and not out.exists()
    return errors[0]


def test_a_budget_below_the_smallest_option_is_refused_before_calibration(tiny_llama_dir, tmp_path, capsys,
                                                                          monkeypatch):  # fmt: skip
    message = _refused(capsys, tmp_path, monkeypatch, tiny_llama_dir, "--scheme", f"auto:2.5:{SYM}",
                       "--format", "compressed-tensors", "--ct-packing", "dense")  # fmt: skip
    assert "below the smallest option" in message


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--scheme", f"auto:4.5:{SYM}", "--format", "gptq"), "GPTQ v1 holds one scheme"),
        (("--scheme", f"auto:4.5:{SYM}", "--format", "gguf"), "GGUF"),
        (("--scheme", "auto:4.5:w2g48,w4g32", "--format", "compressed-tensors"), "option w2g48"),
    ],
)
def test_an_option_the_format_cannot_store_is_refused_before_calibration(args, fragment, tiny_llama_dir, tmp_path,
                                                                         capsys, monkeypatch):  # fmt: skip
    assert fragment in _refused(capsys, tmp_path, monkeypatch, tiny_llama_dir, *args)


@pytest.mark.parametrize("recipe", ["rtn", "hqq", "gptq", "awq+rtn", "signround", "teq+rtn", "omniquant", "let+rtn"])
def test_every_quantizer_rounds_each_linear_at_its_planned_scheme(recipe, tokenizer, text_file):
    from families import RECIPES

    options = {"engine": {"progress": False, "batch_size": 2}, **RECIPES[recipe]}
    result = _quantize(
        _loaded("llama", tokenizer), "auto:5.0:w2g32,w3g32,w4g32,w8g-1", text_file, recipe=recipe, options=options
    )
    plan = result.record["mixed_precision"]["linears"]
    assert len(set(plan.values())) > 1
    assert {name: record.scheme.name for name, record in result.weights.items()} == plan


def test_a_stage_without_per_linear_schemes_is_refused():
    from lowbit.config import build_config

    with pytest.raises(LowbitError, match="per-linear schemes"):
        build_config(recipe="desv", scheme="auto:3.0")


def test_the_report_and_compare_show_the_plan_as_a_heat_map(tokenizer, text_file, tmp_path):
    from lowbit.eval.compare import CompareRow, format_plans
    from lowbit.eval.plan_map import plan_grid
    from lowbit.eval.report import have_matplotlib, write_report

    result = _quantize(_loaded("llama", tokenizer), f"auto:4.5:{SYM}", text_file)
    plan = result.record["mixed_precision"]
    grid = plan_grid(plan)
    assert grid.blocks == [0, 1] and "q_proj" in grid.columns and "down_proj" in grid.columns
    expected = float(parse_scheme(plan["linears"]["model.layers.1.mlp.down_proj"]).bits)
    assert grid.bits[1][grid.columns.index("down_proj")] == expected
    markdown = write_report(result.record, tmp_path, markdown=True).read_text()
    assert "Mixed-precision plan" in markdown and "| block | " in markdown
    if have_matplotlib():
        assert "Mixed-precision plan" in write_report(result.record, tmp_path, markdown=False).read_text()
    row = CompareRow("mixed", "rtn", plan["scheme"], "fake", None, None, plan=plan)
    text = format_plans([row, CompareRow("uniform", "rtn", "w4g32", "fake", None, None)])
    assert text.startswith("mixed: auto:4.5") and text.count("\n") == 1 + len(grid.blocks)


def test_the_lm_estimator_needs_the_whole_model(tokenizer_dir, tmp_path):
    from test_stream_run import checkpoint, export

    model_dir = checkpoint(tmp_path / "model", tokenizer_dir)
    with pytest.raises(LowbitError, match="streamed run"):
        export(model_dir, tmp_path / "out", "on", "rtn", f"auto:3.8:{SYM}:lm", "compressed-tensors", ct_packing="dense")


def test_a_streamed_run_plans_and_writes_what_a_resident_run_does(tokenizer_dir, tmp_path):
    """The planning pass reads each block from the checkpoint like any stage: same plan, same bytes."""
    from test_stream_run import assert_stream_matches, checkpoint

    model_dir = checkpoint(tmp_path / "model", tokenizer_dir)  # bf16: scales stored as bf16
    assert_stream_matches(model_dir, tmp_path, "gptq", f"auto:3.8:{SYM}", "compressed-tensors", ct_packing="dense")
    plans = [yaml.safe_load((tmp_path / run / "out" / PLAN_FILE).read_text()) for run in ("resident", "streamed")]
    assert plans[0] == plans[1] and len(set(plans[0]["linears"].values())) > 1


def test_hessian_loss_is_the_output_error_per_token():
    from lowbit.methods.common.gram import gram_matrix
    from lowbit.mixed.sensitivity import hessian_losses, rtn_error

    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(24, 64, generator=g), torch.randn(50, 64, generator=g)
    options = [parse_scheme(name) for name in ("w2g32", "w4g32", "w8g-1")]
    losses = hessian_losses(w, gram_matrix(x), 50, options)
    for option, loss in zip(options, losses, strict=True):
        expected = float((x @ rtn_error(w, option).T).pow(2).sum() / 50)
        assert loss == pytest.approx(expected, rel=1e-4)
    assert losses[0] > losses[1] > losses[2] > 0
    assert hessian_losses(w, gram_matrix(x), 0, options) == [0.0, 0.0, 0.0]  # an expert no token reached


def test_the_gradient_estimator_scores_fewer_bits_as_worse_and_leaves_the_block_alone():
    from lowbit.mixed.sensitivity import gradient_losses

    g = torch.Generator().manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 64))
    linears = {"0": block[0], "2": block[2]}
    before = {name: lin.weight.detach().clone() for name, lin in linears.items()}
    x = torch.randn(40, 64, generator=g)
    with torch.no_grad():
        target = block(x)

    def backward():
        ((block(x) - target) ** 2).mean().backward()

    scores = gradient_losses(block, linears, [parse_scheme("w2g32"), parse_scheme("w8g-1")], backward)
    assert all(scores[name][0] > scores[name][1] >= 0 for name in linears)
    assert all(torch.equal(linears[name].weight, before[name]) for name in linears)
    assert all(p.grad is None for p in block.parameters())


def test_the_cli_plans_and_reruns_a_plan_file(tiny_llama_dir, text_file, tmp_path):
    from lowbit.cli import main

    common = ["--recipe", "rtn", "--dataset", str(text_file), "--nsamples", "4", "--seqlen", "16", "--format",
              "compressed-tensors", "--ct-packing", "dense", "--quiet"]  # fmt: skip
    assert (
        main(["quantize", str(tiny_llama_dir), "--scheme", f"auto:4.5:{SYM}", *common, "--out", str(tmp_path / "a")])
        == 0
    )
    plan = tmp_path / "a" / PLAN_FILE
    assert (
        main(["quantize", str(tiny_llama_dir), "--scheme-plan", str(plan), *common, "--out", str(tmp_path / "b")]) == 0
    )
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    edited = yaml.safe_load(plan.read_text())
    edited["linears"]["model.layers.0.mlp.down_proj"] = "w5g32"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(edited))
    assert main(["quantize", str(tiny_llama_dir), "--scheme-plan", str(tmp_path / "bad.yaml"), *common, "--out",
                 str(tmp_path / "c")]) == 2  # fmt: skip
