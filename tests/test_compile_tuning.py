"""engine.compile (issue 16): the tuning stages' block forward compiled by torch.compile computes what the eager
forward computes (to float rounding, forward and gradients), the blocks of a model share one compiled graph, and
`on` without the compiler it needs is a clear error before any work starts."""

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import make_llama
from lowbit.arch import arch_for
from lowbit.config import build_config
from lowbit.engine import EngineOptions, call_block, capture_block_inputs, precision, run_block_stages
from lowbit.engine.block_train import EpochSettings, block_forward, train_epochs
from lowbit.engine.precision import resolve_compile
from lowbit.errors import LowbitError
from lowbit.methods.signround.stage import SignRound, SignRoundOptions
from lowbit.quantization import check_run
from lowbit.scheme import parse_scheme

W2 = parse_scheme("w2g32")
IDS = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(0))
CPU = torch.device("cpu")


def forward_and_grads(compile: bool):
    model = make_llama()
    arch = arch_for(model)
    block = arch.blocks(model)[0]
    captured = capture_block_inputs(model, arch, IDS, batch_size=8, device=CPU)
    linears = arch.linears(block)
    weights = {name: linear.weight.detach().clone().requires_grad_() for name, linear in linears.items()}
    forward = block_forward(block, {name: f"{name}.weight" for name in linears}, captured.per_block[0], compile)
    out = forward(weights, captured.hidden[:4])
    out.pow(2).sum().backward()
    return out.detach(), {name: weight.grad for name, weight in weights.items()}


def test_compiled_block_forward_matches_eager_forward_and_gradients():
    eager_out, eager_grads = forward_and_grads(compile=False)
    compiled_out, compiled_grads = forward_and_grads(compile=True)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-4, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def run_signround(compile: str):
    model = make_llama()
    stage = SignRound(SignRoundOptions(iters=4, batch_size=4, autocast="off"), W2)
    options = EngineOptions(progress=False, compile=compile)
    return run_block_stages(model, arch_for(model), [stage], W2, IDS, options, seed=0)


def test_signround_compiled_tunes_like_eager_and_compiles_the_block_once():
    eager = run_signround("off")
    torch._dynamo.reset()
    counters.clear()
    compiled = run_signround("on")
    assert counters["stats"]["unique_graphs"] == 1  # two blocks, one graph: no recompile per block
    for mine, theirs in zip(compiled.metrics, eager.metrics, strict=True):
        assert mine["best_loss"] == pytest.approx(theirs["best_loss"], rel=1e-3)
    equal = total = 0
    for name, record in eager.records.items():
        equal += int((compiled.records[name].codes == record.codes).sum())
        total += record.codes.numel()
    assert equal / total > 0.99  # a sign flip of a near-zero gradient may move a borderline code


def test_compile_modes_and_a_missing_compiler(monkeypatch):
    assert resolve_compile("on", CPU) and not resolve_compile("off", CPU) and not resolve_compile("auto", CPU)
    monkeypatch.setattr(precision.shutil, "which", lambda name: None)
    with pytest.raises(LowbitError, match="C\\+\\+ compiler.*engine.compile=off"):
        resolve_compile("on", CPU)
    assert not resolve_compile("auto", CPU)  # auto never needs the compiler
    config = build_config(recipe="signround", scheme="w2g32", options={"engine": {"compile": "on"}})
    with pytest.raises(LowbitError, match="C\\+\\+ compiler"):  # the API's preflight, before any data
        check_run(config, make_llama())


def test_omniquant_trains_the_same_compiled():
    """OmniQuant's forward (LET-transformed weights and norms, LWC) compiled: the same epoch losses."""
    from test_omniquant import omni_block

    losses = []
    for compile in (False, True):
        omni, hidden, kwargs = omni_block(make_llama())
        targets = call_block(omni.block, hidden, kwargs).detach()
        forward = block_forward(omni.block, {key: key for key in omni.block_params()}, kwargs, compile)
        record = train_epochs(omni, forward, hidden, targets, None, EpochSettings(epochs=2), device=CPU)
        losses.append(record.epoch_losses)
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
