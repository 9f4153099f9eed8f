import copy

import pytest
import torch

from lowbit.arch import arch_for
from lowbit.engine import EngineOptions, call_block, capture_block_inputs, run_block_stages
from lowbit.engine.stage import NoOptions
from lowbit.methods.rtn import RTN, rtn_quantize_model
from lowbit.quantizer import quantize_weight
from lowbit.scheme import parse_scheme
from stages_for_tests import RecordingRTN

SCHEME = parse_scheme("w4g32")


def calibration_ids(n=6, length=24, vocab=320, seed=0):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def block_outputs_from_model(model, ids):
    """The model's own block outputs, recorded with forward hooks during a normal forward pass."""
    arch = arch_for(model)
    outputs = []
    handles = [
        block.register_forward_hook(lambda _m, _a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
        for block in arch.blocks(model)
    ]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return outputs


def test_captured_inputs_replay_to_the_models_own_block_outputs(tiny_model):
    ids = calibration_ids()
    arch = arch_for(tiny_model)
    captured = capture_block_inputs(tiny_model, arch, ids, batch_size=4, device=torch.device("cpu"))
    assert captured.hidden.shape == (6, 24, 64)
    expected = block_outputs_from_model(tiny_model, ids)
    hidden = captured.hidden
    with torch.no_grad():
        for block, want in zip(arch.blocks(tiny_model), expected, strict=True):
            hidden = torch.cat([call_block(block, hidden[i : i + 2], captured.kwargs) for i in range(0, 6, 2)])
            torch.testing.assert_close(hidden, want, rtol=1e-5, atol=1e-5)


def test_rtn_through_the_engine_equals_rtn_applied_directly(tiny_model):
    reference = rtn_quantize_model(copy.deepcopy(tiny_model), arch_for(tiny_model), SCHEME)
    arch = arch_for(tiny_model)
    records, metrics = (
        (
            found := run_block_stages(
                tiny_model, arch, [RTN(NoOptions(), SCHEME)], SCHEME, None, EngineOptions(progress=False), seed=0
            )
        ).records,
        found.metrics,
    )
    assert records.keys() == reference.keys()
    assert len(metrics) == 2
    params = dict(tiny_model.named_parameters())
    for name, record in records.items():
        assert torch.equal(record.codes, reference[name].codes)
        assert torch.equal(record.scale, reference[name].scale)
        assert torch.equal(record.zero, reference[name].zero)
        assert torch.equal(params[f"{name}.weight"], record.dequantize())


@pytest.mark.parametrize("quantized_input", [True, False])
def test_block_inputs_follow_the_requested_chain(tiny_model, quantized_input):
    ids = calibration_ids()
    arch = arch_for(tiny_model)
    float_model = copy.deepcopy(tiny_model)
    stage = RecordingRTN(NoOptions(), SCHEME)
    options = EngineOptions(batch_size=4, quantized_input=quantized_input, progress=False)
    run_block_stages(tiny_model, arch, [stage], SCHEME, ids, options, seed=0)

    float_outputs = block_outputs_from_model(float_model, ids)
    first, second = stage.seen
    torch.testing.assert_close(first["targets"], float_outputs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second["fp_inputs"], float_outputs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second["targets"], float_outputs[1], rtol=1e-5, atol=1e-5)
    if quantized_input:
        # block 1's student input is the quantized block 0 applied to block 0's own input
        kwargs = capture_block_inputs(float_model, arch, ids[:1], batch_size=1, device=torch.device("cpu")).kwargs
        with torch.no_grad():
            expected = call_block(arch.blocks(tiny_model)[0], first["inputs"], kwargs)
        torch.testing.assert_close(second["inputs"], expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(second["inputs"], second["fp_inputs"])
    else:
        assert torch.equal(second["inputs"], second["fp_inputs"])


def test_a_stage_that_reads_only_its_inputs_skips_the_float_chain(tiny_model):
    class InputsOnlyRTN(RecordingRTN):
        uses_float_chain = False

        def process_block(self, ctx):
            self.seen.append({"inputs": ctx.inputs.clone(), "fp_inputs": ctx.fp_inputs, "targets": ctx.targets})
            for name, linear in ctx.linears().items():
                ctx.quantized[name] = quantize_weight(linear.weight.detach(), self.scheme)

    ids = calibration_ids()
    arch = arch_for(tiny_model)
    options = EngineOptions(batch_size=4, progress=False)
    reference, skipping = RecordingRTN(NoOptions(), SCHEME), InputsOnlyRTN(NoOptions(), SCHEME)
    run_block_stages(copy.deepcopy(tiny_model), arch, [reference], SCHEME, ids, options, seed=0)
    run_block_stages(tiny_model, arch, [skipping], SCHEME, ids, options, seed=0)
    for want, got in zip(reference.seen, skipping.seen, strict=True):
        assert got["fp_inputs"] is None and got["targets"] is None
        assert torch.equal(got["inputs"], want["inputs"])  # the quantized chain is unchanged


def test_engine_is_deterministic(tiny_model):
    ids = calibration_ids()
    arch = arch_for(tiny_model)
    runs = []
    for _ in range(2):
        model = copy.deepcopy(tiny_model)
        records = run_block_stages(
            model,
            arch,
            [RecordingRTN(NoOptions(), SCHEME)],
            SCHEME,
            ids,
            EngineOptions(progress=False),
            seed=3,
        ).records
        runs.append(records)
    for name in runs[0]:
        assert torch.equal(runs[0][name].codes, runs[1][name].codes)
