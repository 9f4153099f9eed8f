"""GGUF IQ4_NL, lowbit's `nl` kind: 16 non-uniform levels times an fp16 scale per block of 32. llama.cpp writes it
for Q2_K/Q3_K rows that are not a multiple of 256 (the q2_k_s and q3_k_m mixes on most small models)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import lowbit
from conftest import save_model_dir
from lowbit.errors import LowbitError
from lowbit.export.gguf.blocks import pack_record
from lowbit.formats.gguf_types import IQ4_NL_VALUES, codebook_index, codebook_value
from lowbit.quantizer import fake_quant, quantize_weight
from lowbit.scheme import QuantScheme, parse_scheme

LEVELS = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32)


def test_rounding_the_continuous_code_picks_the_nearest_level():
    y = torch.linspace(-140.0, 130.0, 20001)
    codes = codebook_index(y, IQ4_NL_VALUES).round().clamp(0, 15)
    nearest = (y[:, None] - LEVELS).abs().argmin(dim=1).float()
    off = codes != nearest  # only exact midpoints may differ (a tie)
    assert torch.allclose((y[off] - LEVELS[codes[off].long()]).abs(), (y[off] - LEVELS[nearest[off].long()]).abs())
    assert torch.equal(codebook_value(torch.arange(16.0), IQ4_NL_VALUES), LEVELS)  # the levels exactly


def test_the_larger_side_of_a_block_lands_exactly_on_the_first_level():
    w = torch.randn(4, 64)
    w[0, 3], w[1, 40] = 5.0, -5.0  # row 0: the positive side dominates (a negative scale), row 1: the negative
    record = quantize_weight(w, parse_scheme("gguf:iq4_nl"))
    record.validate()
    assert float(record.scale[0, 0]) < 0 < float(record.scale[1, 1])
    decoded = record.dequantize()
    assert abs(float(decoded[0, 3]) - 5.0) < 5e-3 and abs(float(decoded[1, 40]) + 5.0) < 5e-3


def test_codes_decode_exactly_in_gguf_and_train_with_gradients():
    scheme = parse_scheme("gguf:iq4_nl")
    w = torch.randn(16, 128, requires_grad=True)
    v = torch.zeros(16, 128, requires_grad=True)
    q = fake_quant(w, scheme, v=v)
    (q * torch.randn_like(q)).sum().backward()
    assert float(w.grad.abs().sum()) > 0 and float(v.grad.abs().sum()) > 0  # SignRound's offsets move codes
    record = quantize_weight(w.detach(), scheme)
    assert torch.equal(record.dequantize(), q.detach())
    decoded = gguf.quants.dequantize(pack_record(record), gguf.GGMLQuantizationType.IQ4_NL)
    assert np.array_equal(decoded.reshape(16, 128), record.dequantize().numpy())


def test_the_kind_lives_on_gguf_only_and_hqq_refuses_it():
    with pytest.raises(LowbitError, match="gguf:iq4_nl"):
        QuantScheme(bits=4, group_size=32, kind="nl")
    with pytest.raises(LowbitError, match="non-uniform levels"):
        lowbit.quantize(model="/nonexistent", recipe="hqq", scheme="gguf:iq4_nl")


def test_each_type_of_a_mix_is_checked_against_the_stages_before_it_quantizes(tmp_path, tokenizer):
    from test_export_gguf import make_mixed_llama

    source = save_model_dir(tmp_path / "src", make_mixed_llama(), tokenizer)  # rows of 288: Q3_K falls back
    with pytest.raises(LowbitError, match="hqq fits .* GGUF iq4_nl"):  # Q3_K's fallback, first by name
        lowbit.quantize(model=str(source), recipe="hqq", scheme="gguf:q3_k_m-sym")
