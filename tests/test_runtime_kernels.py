"""The packed runtime's kernel paths (torch's int4/int8 CPU matmuls) against its bit-exact reference path.

Tolerances are the ones runtime.py states: the int4 path computes in bf16 (the kernel's only fast path), so a layer's
output is within kernels.INT4_TOL (2e-2) * max|output| of the reference path's on the same input and a model's logits
within 3e-2 * max|logit|, with the same greedy tokens; the int8 path stays fp32 (1e-5 per layer).
"""

from __future__ import annotations

import logging

import pytest
import torch

import lowbit
from conftest import make_llama, save_model_dir
from lowbit.errors import LowbitError
from lowbit.models import load_model
from lowbit.quantizer import quantize_weight
from lowbit.runtime import kernels
from lowbit.runtime.packed_linear import PackedLinear
from lowbit.scheme import parse_scheme

LAYER_TOL = kernels.INT4_TOL  # int4 (bf16 compute), relative to max |output| of the layer
INT8_TOL = 1e-5  # int8 (fp32 compute)
LOGIT_TOL = 3e-2  # relative to max |logit|
PROMPTS = [torch.arange(3, 11), torch.arange(40, 52), torch.tensor([7, 300, 12, 99, 5, 5, 61])]

pytestmark = pytest.mark.skipif(not kernels.int4_available(), reason="torch has no usable int4 CPU kernel")


def _layer(scheme: str, shape: tuple[int, int], seed: int = 0, bias: bool = True):
    torch.manual_seed(seed)
    w = torch.randn(*shape)
    record = quantize_weight(w, parse_scheme(scheme), bias=torch.randn(shape[0]) if bias else None)
    return record, PackedLinear.from_record(record), PackedLinear.from_record(record)


def _assert_close(got: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    torch.testing.assert_close(got, expected, rtol=0, atol=tol * float(expected.abs().max()))


@pytest.mark.parametrize("kind", ["asym", "sym"])
@pytest.mark.parametrize("group", [32, 64, 128, 256, 512, -1])
def test_int4_kernel_matches_the_reference_layer(kind, group):
    record, reference, fast = _layer(f"w4g{group}-{kind}", (48, 1024))
    assert fast.use_kernel("auto") == "int4" and reference.path == "reference"
    assert fast.kernel_group == (256 if group in (512, -1) else group)
    assert fast.packed is None  # one packed copy of the codes, in the kernel's layout
    assert torch.equal(fast.codes(), record.codes) and torch.equal(fast.dequantize(), record.dequantize())
    with torch.no_grad():
        for tokens in (1, 7, 130):
            x = torch.randn(2, tokens, 1024)
            _assert_close(fast(x), reference(x), LAYER_TOL)
        assert fast(x.bfloat16()).dtype == torch.bfloat16  # the output keeps the input's dtype


def test_int8_kernel_takes_symmetric_per_channel_only():
    record, reference, fast = _layer("w8g-1-sym", (64, 192))
    assert fast.use_kernel() == "int8"
    assert torch.equal(fast.dequantize(), record.dequantize())
    x = torch.randn(5, 192)
    with torch.no_grad():
        _assert_close(fast(x), reference(x), INT8_TOL)
    assert _layer("w8g-1-asym", (64, 192))[2].use_kernel() == "reference"  # code - zero leaves int8
    assert _layer("w8g32-sym", (64, 192))[2].use_kernel() == "reference"  # grouped: the kernel is per-channel


@pytest.mark.parametrize(
    ("scheme", "shape", "reason"),
    [
        ("w2g32", (64, 128), "2-bit"),
        ("w3g32", (64, 96), "3-bit"),
        ("w4g48", (64, 64), "partial last group"),
        ("w4g16", (64, 64), "group 16"),
        ("w4g32", (40, 64), "out_features 40"),
    ],
)
def test_layers_the_kernels_cannot_take_stay_bit_exact(scheme, shape, reason):
    record, _, layer = _layer(scheme, shape)
    assert layer.use_kernel("auto") == "reference" and reason in layer.path_reason
    x = torch.randn(3, shape[1])
    with torch.no_grad():
        assert torch.equal(layer(x), torch.nn.functional.linear(x, record.dequantize(), record.bias))


def test_act_order_and_missing_kernels_fall_back(monkeypatch):
    record, _, layer = _layer("w4g32", (64, 128))
    layer.g_idx = torch.arange(128).flip(0) // 32
    assert layer.use_kernel() == "reference" and "g_idx" in layer.path_reason
    monkeypatch.setattr(kernels, "int4_available", lambda: False)
    assert _layer("w4g32", (64, 128))[2].use_kernel() == "reference"
    with pytest.raises(LowbitError, match="kernel='fast' is not known"):
        _layer("w4g32", (64, 128))[2].use_kernel("fast")


# ----------------------------------------------------------------------------------------------------------
# a tiny Llama exported as compressed-tensors / GPTQ, loaded on both paths

CASES = [("compressed-tensors", "w4g32-sym"), ("compressed-tensors", "w4g32"), ("compressed-tensors", "w4g-1"),
         ("gptq", "w4g32-sym")]  # fmt: skip


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("kernel-exports")
    source = save_model_dir(tmp / "src", make_llama(), tokenizer)
    built = {}
    for fmt, scheme in CASES:
        result = lowbit.quantize(load_model(str(source)), recipe="rtn", scheme=scheme)
        built[fmt, scheme] = result.save(tmp / f"{fmt}-{scheme}", format=fmt)
    return built


def _layer_io(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every PackedLinear's (input, output) in one forward."""
    seen, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, PackedLinear):
            hook = module.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, (a[0], out)))
            hooks.append(hook)
    with torch.no_grad():
        model(ids.unsqueeze(0))
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case[0]}-{case[1]}")
def test_kernel_model_matches_the_reference_model(case, exports, caplog):
    with caplog.at_level(logging.DEBUG, logger="lowbit.runtime.kernels"):
        fast = lowbit.load(exports[case]).model
    records = [r for r in caplog.records if r.name == "lowbit.runtime.kernels"]
    summaries = [r.getMessage() for r in records if r.levelno == logging.INFO]
    assert summaries == ["packed runtime (kernel=auto): 14 int4 linear layers"]
    assert sum("int4 path" in r.getMessage() for r in records if r.levelno == logging.DEBUG) == 14
    reference = lowbit.load(exports[case], kernel="reference").model
    assert {m.path for m in reference.modules() if isinstance(m, PackedLinear)} == {"reference"}

    # each layer on the reference model's own input: the kernel's error alone, not its propagation
    fast_layers = dict(fast.named_modules())
    for name, (x, expected) in _layer_io(reference, PROMPTS[1]).items():
        with torch.no_grad():
            _assert_close(fast_layers[name](x), expected, LAYER_TOL)
    with torch.no_grad():
        for ids in PROMPTS:
            _assert_close(fast(ids.unsqueeze(0)).logits, reference(ids.unsqueeze(0)).logits, LOGIT_TOL)
            runs = [m.generate(ids.unsqueeze(0), max_new_tokens=16, do_sample=False, pad_token_id=0)
                    for m in (fast, reference)]  # fmt: skip
            assert torch.equal(runs[0], runs[1])


def test_load_refuses_an_unknown_kernel(exports):
    with pytest.raises(LowbitError, match="kernel='int4' is not known"):
        lowbit.load(exports["compressed-tensors", "w4g32"], kernel="int4")


def test_cli_eval_takes_the_kernel_option(exports, text_file, capsys):
    from lowbit.cli import main

    out = exports["compressed-tensors", "w4g32"]
    flags = ["--ppl", str(text_file), "--eval-seqlen", "32", "--eval-windows", "1", "--no-record", "-q"]
    ppl = {}
    for kernel in ("auto", "reference"):
        assert main(["eval", str(out), "--kernel", kernel, *flags]) == 0
        printed = capsys.readouterr().out
        assert f"packed CPU runtime (kernel={kernel})" in printed
        ppl[kernel] = float(printed.split("tokens): ")[1].split()[0])
    assert ppl["auto"] == pytest.approx(ppl["reference"], rel=1e-3)
