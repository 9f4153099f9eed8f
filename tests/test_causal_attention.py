"""The engine's chunked causal attention (issue 16): the same attention as SDPA, forward and backward, on every
shape the block loop meets; switched only on SDPA modules, restored afterwards, and SDPA wherever it cannot be
exact (masks, sliding windows)."""

import pytest
import torch
import torch.nn.functional as F

from conftest import make_llama
from families import make_family
from lowbit import actquant
from lowbit.arch import arch_for
from lowbit.engine import EngineOptions, capture_block_inputs, run_block_stages
from lowbit.engine.causal_attention import (
    ATTENTION_NAME,
    block_attention,
    chunked_causal_attention,
    lowbit_chunked_attention,
)
from lowbit.methods.rtn import RTN
from lowbit.methods.signround.stage import SignRound, SignRoundOptions
from lowbit.scheme import parse_scheme

IDS = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(0))


def reference(q, k, v, scale):
    """SDPA in fp64: the exact attention the chunks must reproduce."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q64, k64, v64, is_causal=True, scale=scale, enable_gqa=True)
    return out, (q64, k64, v64)


@pytest.mark.parametrize(("length", "chunk", "kv_heads"), [(37, 8, 2), (64, 64, 6), (50, 128, 3), (33, 16, 1)])
def test_forward_and_gradients_match_sdpa(length, chunk, kv_heads):
    gen = torch.Generator().manual_seed(length)
    q = torch.randn(2, 6, length, 16, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, length, 16, generator=gen, requires_grad=True) for _ in range(2))
    upstream = torch.randn(2, 6, length, 16, generator=gen)
    out = chunked_causal_attention(q, k, v, 0.3, chunk)
    (out * upstream).sum().backward()
    ref, leaves = reference(q, k, v, 0.3)
    (ref * upstream.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip((q, k, v), leaves, strict=True):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, atol=1e-5, rtol=1e-5)


def test_autocast_runs_in_bf16_and_close():
    """Under autocast every operand goes to bf16, as SDPA does (RoPE hands over fp32 q/k next to a bf16 v)."""
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, 4, 40, 16, generator=gen).requires_grad_() for _ in range(2))
    v = torch.randn(2, 4, 40, 16, generator=gen).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = chunked_causal_attention(q, k, v, 0.25, 16)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and q.grad.dtype == torch.float32 and v.grad.dtype == torch.bfloat16
    ref, leaves = reference(q, k, v, 0.25)
    ref.sum().backward()
    assert (out.double() - ref).abs().max() < 3e-2
    assert (q.grad.double() - leaves[0].grad).abs().max() < 5e-2


def test_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="same length"):
        chunked_causal_attention(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), 1.0)


def block_outputs(model, mode):
    """Outputs and input gradients of every block of `model` on captured inputs, with attention `mode`."""
    arch = arch_for(model)
    captured = capture_block_inputs(model, arch, IDS, batch_size=8, device=torch.device("cpu"))
    outs = []
    for index, block in enumerate(arch.blocks(model)):
        hidden = captured.hidden.clone().requires_grad_()
        with block_attention(block, arch.attention, mode) as switched:
            out = block(hidden, **captured.per_block[index])
            out = out[0] if isinstance(out, tuple) else out
            out.square().sum().backward()
        outs.append((switched, out.detach(), hidden.grad))
    return outs


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_llama_block_same_as_sdpa_and_config_restored(kv_heads):
    model = make_llama(kv_heads=kv_heads)
    attention = model.model.layers[0].self_attn
    config = attention.config
    sdpa, chunked = block_outputs(model, "sdpa"), block_outputs(model, "chunked")
    assert attention.config is config and config._attn_implementation == "sdpa"
    for (off, out_a, grad_a), (on, out_b, grad_b) in zip(sdpa, chunked, strict=True):
        assert not off and on
        torch.testing.assert_close(out_b, out_a, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grad_b, grad_a, atol=1e-5, rtol=1e-4)


def test_eager_attention_is_left_alone():
    model = make_llama()
    model.set_attn_implementation("eager")
    block = model.model.layers[0]
    with block_attention(block, "self_attn", "chunked") as switched:
        assert not switched and block.self_attn.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="attention mode"), block_attention(block, "self_attn", "fast"):
        pass


def test_sliding_window_family_falls_back_to_sdpa():
    """Gemma 3's sliding layers pass a sliding window (and a mask): the kernel hands them to SDPA unchanged (bit for
    bit); its global layers run chunked (same attention up to float rounding)."""
    model = make_family("gemma3")
    sliding = [t == "sliding_attention" for t in model.config.layer_types]
    assert any(sliding) and not all(sliding)
    for is_sliding, (_, out_a, grad_a), (_, out_b, grad_b) in zip(
        sliding, block_outputs(model, "sdpa"), block_outputs(model, "chunked"), strict=True
    ):
        tolerance = {"atol": 0.0, "rtol": 0.0} if is_sliding else {"atol": 1e-4, "rtol": 1e-3}
        torch.testing.assert_close(out_b, out_a, **tolerance)
        torch.testing.assert_close(grad_b, grad_a, **tolerance)


def test_padding_mask_goes_to_sdpa():
    attention = make_llama().model.layers[0].self_attn
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 4, 6, 16, generator=gen) for _ in range(3))
    mask = torch.zeros(1, 1, 6, 6).masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    mask[..., 0] = float("-inf")  # a padded first token
    mask[..., 0, 0] = 0.0
    out, _ = lowbit_chunked_attention(attention, q, k, v, mask, scaling=0.25)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25).transpose(1, 2)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("precision", ["off", "bf16"])
def test_engine_option_runs_signround_on_chunked_attention(precision):
    """`--opt engine.attention=chunked`: every block trains and replays on the kernel; same result as SDPA's up to
    float rounding (the losses agree closely), recorded in the block metrics."""
    scheme = parse_scheme("w2g32")
    losses = {}
    for mode in ("sdpa", "chunked"):
        model = make_llama(kv_heads=2)
        stage = SignRound(SignRoundOptions(iters=6, batch_size=4, autocast=precision), scheme)
        result = run_block_stages(
            model, arch_for(model), [stage], scheme, IDS, EngineOptions(progress=False, attention=mode), seed=0
        )
        assert all(("attention" in m) == (mode == "chunked") for m in result.metrics)
        assert model.model.layers[0].self_attn.config._attn_implementation == "sdpa"
        losses[mode] = [m["best_loss"] for m in result.metrics]
    # bf16 rounding alone moves these ~2e-5 block losses by several percent; a wrong gradient moves them far more
    assert losses["chunked"] == pytest.approx(losses["sdpa"], rel=1e-3 if precision == "off" else 0.15)


def test_activation_quantization_accepts_the_chunked_kernel():
    """A W-A recipe installs activation quantization on a block already switched to the kernel."""
    assert ATTENTION_NAME in actquant._DELEGATES
    model = make_llama()
    scheme = parse_scheme("w4a4")
    result = run_block_stages(
        model, arch_for(model), [RTN(RTN.Options(), scheme)], scheme, IDS, EngineOptions(progress=False,
        attention="chunked"), seed=0,
    )  # fmt: skip
    assert len(result.records) == 14
