"""Gemma 2, Gemma 3 (text), Qwen3 and Phi-3 on tiny random models: per-layer capture, exact scale groups (Gemma's
(1 + w) norms, Phi-3's fused row slices), the q<->k pair only where it is an equivalence, every stage running or
refusing clearly, and fake / compressed-tensors / GPTQ exports reloading with matching logits."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.func import functional_call
from transformers import AutoModelForCausalLM

import lowbit
from conftest import save_model_dir
from families import NEW_FAMILIES, RECIPES, assert_capture_replays, block_io, make_family
from lowbit.arch import arch_for
from lowbit.engine import call_block, capture_block_inputs
from lowbit.errors import LowbitError
from lowbit.methods import STAGES
from lowbit.methods.common.fold import fold_group, group_width
from lowbit.methods.omniquant.let import LetPair, apply_let, let_groups, make_qk_scale
from lowbit.methods.teq.scales import fold_scale_set, make_scale_set, unwrap_block, wrap_block
from lowbit.models import load_model
from lowbit.scheme import parse_scheme
from test_export_gptq import reference_decode

CPU = torch.device("cpu")
IDS = torch.randint(3, 320, (3, 24), generator=torch.Generator().manual_seed(0))


def _rand(n: int, seed: int, low: float = 0.25, span: float = 3.0) -> torch.Tensor:
    return low + span * torch.rand(n, generator=torch.Generator().manual_seed(seed))


def setup(family: str, kv_heads: int = 4):
    model = make_family(family, kv_heads)
    arch = arch_for(model)
    captured = capture_block_inputs(model, arch, IDS, batch_size=2, device=CPU)
    return model, arch, captured, *block_io(model, arch, IDS)


# --- capture: each block replays exactly with its own layer's kwargs --------------------------------------------


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_capture_replays_every_block_with_its_own_kwargs(family):
    model, arch, captured, _, _ = setup(family)
    assert_capture_replays(model, arch, captured, IDS)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_alternating_layers_get_their_own_kwargs_and_equal_ones_share_storage(family):
    model, arch, captured, ins, outs = setup(family)
    k0, k1, k2 = (captured.kwargs_for(i) for i in range(3))
    assert [key for key in k0 if k0[key] is not k1[key]], "sliding and global layers should differ"
    assert all(k0[key] is k2[key] for key in k0), "layers of one type share their kwargs"
    with torch.no_grad():  # block 0's kwargs are wrong for the global block 1 (the bug this capture fixes)
        assert not torch.allclose(call_block(arch.blocks(model)[1], ins[1], k0), outs[1], atol=1e-5)


# --- exact equivalences ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_every_scale_group_is_an_exact_fold(family, kv_heads):
    model, arch, captured, ins, outs = setup(family, kv_heads)
    for i, block in enumerate(arch.blocks(model)):
        groups = arch.groups_for(block)
        assert len(groups) == (4 if kv_heads == 4 else 3)  # GQA skips v->o
        for j, group in enumerate(groups):
            fold_group(block, group, _rand(group_width(block, group), 10 * i + j), arch=arch)
        with torch.no_grad():
            torch.testing.assert_close(call_block(block, ins[i], captured.kwargs_for(i)), outs[i], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_let_transform_is_exact_and_qk_only_where_it_is_an_equivalence(family):
    model, arch, captured, ins, outs = setup(family)
    block, kwargs = arch.blocks(model)[1], captured.kwargs_for(1)
    params = {name: p.detach().float().clone() for name, p in block.named_parameters()}
    groups = let_groups(arch, block)
    pairs = [LetPair(g, _rand(group_width(block, g), j, 0.5, 1.0), None, arch.prev_rows(block, g))
             for j, g in enumerate(groups)]  # fmt: skip
    qk = make_qk_scale(arch, block, "rotary")
    assert (qk is None) == (family in ("qwen3", "gemma3", "phi3"))
    if qk is not None:
        qk.scale.data = _rand(qk.scale.numel(), 7, 0.5, 1.0)
    with torch.no_grad():
        out = functional_call(block, apply_let(params, pairs, qk, False, arch.norm_offset), (ins[1],), kwargs)
    torch.testing.assert_close(out, outs[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_qk_scaling_is_not_an_equivalence_under_qk_norm(family):
    model, arch, captured, ins, outs = setup(family)
    block = arch.blocks(model)[0]
    qk = make_qk_scale(dataclasses.replace(arch, qk_norm=False), block, "rotary")
    qk.scale.data = _rand(qk.scale.numel(), 3, 0.5, 1.0)
    params = {name: p.detach().float().clone() for name, p in block.named_parameters()}
    with torch.no_grad():
        out = functional_call(block, apply_let(params, [], qk), (ins[0],), captured.kwargs_for(0))
    assert not torch.allclose(out, outs[0], atol=1e-3)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_teq_wrapped_and_folded_blocks_compute_the_float_function(family):
    model, arch, captured, ins, outs = setup(family)
    block, kwargs = arch.blocks(model)[2], captured.kwargs_for(2)
    scale_set = make_scale_set(arch, block, "all", "ones")
    for j, scale in enumerate(scale_set.scales.values()):
        scale.data = _rand(scale.numel(), j, 0.5, 1.0)
    wrap_block(arch, scale_set, parse_scheme("w4g32"), quantize=False)
    with torch.no_grad():
        torch.testing.assert_close(call_block(block, ins[2], kwargs), outs[2], rtol=1e-4, atol=1e-4)
        unwrap_block(arch, block)
        fold_scale_set(scale_set)
        torch.testing.assert_close(call_block(block, ins[2], kwargs), outs[2], rtol=1e-4, atol=1e-4)


# --- every stage runs or refuses clearly -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("families")
    return {family: save_model_dir(root / family, make_family(family), tokenizer) for family in NEW_FAMILIES}


def run(directory, recipe, text_file, scheme="w4g32", options=None):
    return lowbit.quantize(
        load_model(str(directory)), recipe=recipe, scheme=scheme, dataset=str(text_file), nsamples=4, seqlen=16,
        seed=0, options={"engine": {"progress": False, "batch_size": 2}, **(options or {})},
    )  # fmt: skip


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_every_stage_runs_or_refuses_clearly(family, recipe, family_dirs, text_file):
    arch = arch_for(make_family(family))
    reasons = [STAGES[name].refuses(arch) for name in recipe.split("+")]
    if any(reasons):
        with pytest.raises(LowbitError, match=f"does not support the {family} family"):
            run(family_dirs[family], recipe, text_file, options=RECIPES[recipe])
        return
    result = run(family_dirs[family], recipe, text_file, options=RECIPES[recipe])
    assert len(result.weights) == 4 * len(arch.linear_names)
    with torch.no_grad():
        assert bool(torch.isfinite(result.model(IDS).logits).all())
    if "invarexplore" in recipe:
        assert result.record["stages"]["invarexplore"]["fold_check"] == "bit-identical"
    if result.record["calibration"]:  # Gemma's calibration windows start with BOS, the others' keep the protocol
        assert result.record["calibration"]["bos_first"] == arch.window_bos


# --- exports reload in transformers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(family_dirs, text_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("family-exports")
    built = {}
    for family in NEW_FAMILIES:
        result = run(family_dirs[family], "rtn", text_file, scheme="w4g32-sym")
        with torch.no_grad():
            logits = result.model(IDS[:1]).logits
        outs = {
            fmt: result.save(root / f"{family}-{fmt}", format=fmt) for fmt in ("fake", "compressed-tensors", "gptq")
        }
        built[family] = (result, logits, outs)
    return built


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_fake_and_gptq_exports_reload_with_matching_logits(family, exported):
    result, logits, outs = exported[family]
    fake = AutoModelForCausalLM.from_pretrained(outs["fake"]).eval()
    tensors = load_file(outs["gptq"] / "model.safetensors")
    for name, record in result.weights.items():
        assert torch.equal(reference_decode(tensors, name, 4), record.dequantize())
    with torch.no_grad():
        torch.testing.assert_close(fake(IDS[:1]).logits, logits, rtol=0, atol=1e-5 * float(logits.abs().max()))
        for fmt in ("gptq", "compressed-tensors"):  # the bit-exact path; the kernels: test_runtime_kernels.py
            assert torch.equal(lowbit.load(outs[fmt], kernel="reference").model(IDS[:1]).logits, logits)


def test_compressed_tensors_exports_load_in_transformers(exported):
    pytest.importorskip("compressed_tensors")
    dirs = [str(outs["compressed-tensors"]) for _, _, outs in exported.values()]
    script = Path(__file__).with_name("thirdparty_ct_load.py")
    done = subprocess.run([sys.executable, str(script), *dirs], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ids = torch.arange(3, 43).unsqueeze(0)  # what the third-party script feeds
    for result, _, outs in exported.values():
        loaded = torch.load(outs["compressed-tensors"] / "thirdparty.pt")["logits"]
        with torch.no_grad():
            expected = result.model(ids).logits
        torch.testing.assert_close(loaded, expected, rtol=0, atol=1e-3 * float(expected.abs().max()))


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "qwen3"])
def test_invarexplore_incremental_objective_matches_a_full_forward(family):
    """The fast path rebuilds h_mid + post_norm(FFN(pre_norm(h_mid))), per-layer kwargs and Gemma 2's soft-capped
    head itself; the naive path is the model's own forward."""
    from lowbit.methods.invarexplore.search import InvarSearch
    from lowbit.methods.invarexplore.stage import InvarExploreOptions

    model = make_family(family)
    ids = torch.randint(3, 320, (4, 24), generator=torch.Generator().manual_seed(1))
    opts = InvarExploreOptions(samples=4, monitored_layers=2, batch_size=2, ce_chunk=40, progress=False)
    search = InvarSearch(model, arch_for(model), parse_scheme("w3g32"), ids, opts, seed=0, device="cpu")
    search.prepare()
    for step in range(6):
        search.step(step)
        value = search.objective(search.evaluator.current)
        assert search.objective(search.evaluator.naive()) == pytest.approx(value, rel=1e-5)


# --- BOS-first windows (Gemma), the registry and the support matrix ----------------------------------------------


def test_rows_get_a_leading_bos_without_changing_length():
    from lowbit.data import with_leading_bos

    rows = torch.tensor([[0, 5, 6, 7], [4, 5, 6, 7]])
    assert with_leading_bos(rows, 0).tolist() == [[0, 5, 6, 7], [0, 4, 5, 6]]


def test_perplexity_windows_start_with_bos_for_gemma_only():
    from lowbit.eval.perplexity import perplexity

    stream = torch.randint(3, 320, (1, 61), generator=torch.Generator().manual_seed(2))
    stream[0, 0] = 0  # the tokenizer's own leading BOS is dropped, then each window is BOS + 15 tokens
    gemma, qwen = make_family("gemma2"), make_family("qwen3")
    result = perplexity(gemma, stream, seqlen=16, progress=False)
    assert result.bos_first and result.windows == 4
    nlls = []
    with torch.no_grad():
        for index in range(4):
            window = torch.cat([torch.tensor([0]), stream[0, 1 + 15 * index : 1 + 15 * (index + 1)]])[None]
            logits = gemma(input_ids=window).logits
            nlls.append(torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:]).item())
    assert result.mean_nll == pytest.approx(sum(nlls) / 4, rel=1e-6)
    plain = perplexity(qwen, stream, seqlen=16, progress=False)
    assert not plain.bos_first and plain.windows == 3  # the GPTQ protocol, unchanged


def test_registry_and_support_matrix():
    from lowbit.cli import main
    from lowbit.support import support_matrix

    assert arch_for(make_family("qwen3")).family == "qwen3"
    with pytest.raises(LowbitError, match="Gemma3ForCausalLM"):
        arch_for(dataclasses.make_dataclass("C", [("model_type", str)])("gemma3"))
    rows = {row["family"]: row for row in support_matrix()}
    assert set(rows) >= {"llama-like", "opt", "qwen3", "gemma2", "gemma3", "phi3"}
    assert "fused gate_up_proj" in rows["phi3"]["stages"]["invarexplore"]
    assert all(value == "yes" for value in rows["gemma2"]["stages"].values())
    assert main(["archs"]) == 0
