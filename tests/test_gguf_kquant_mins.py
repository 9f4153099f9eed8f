"""GGUF's offset grids, lowbit's `asym_min` kind: Q4_1/Q5_1 (`w = d*q + m`, fp16 m) and the K-quants with mins
(Q2_K, Q4_K, Q5_K: `w = d*sc*q - dmin*m`, offsets double-quantized like the scales). The file holds exactly the
evaluated weights; `-asym` (Q4_1/Q5_1) and `-sym` (K-quants) keep lowbit's integer-zero grids."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import lowbit
from conftest import save_model_dir
from lowbit.arch import arch_for
from lowbit.errors import LowbitError
from lowbit.export.gguf.blocks import pack_record
from lowbit.export.gguf.mixes import mix_schemes
from lowbit.formats.gguf_types import GGUF_TYPES, split_double_quant_min
from lowbit.quantizer import fake_quant, quantize_weight
from lowbit.scheme import QuantScheme, parse_scheme
from test_export_gguf import make_mixed_llama

WITH_MINS = [name for name, t in GGUF_TYPES.items() if "asym_min" in t.kinds and t.double_quant]
INTEGER_ZERO = {"q4_1": "-asym", "q5_1": "-asym", "q2_k": "-sym", "q4_k": "-sym", "q5_k": "-sym"}


def _off_centre(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 512, generator=g) * 0.02 + torch.rand(32, 1, generator=g) * 0.03


def test_offset_grids_are_the_defaults_of_the_types_that_store_an_offset():
    assert [n for n, t in GGUF_TYPES.items() if t.kinds[0] == "asym_min"] == list(INTEGER_ZERO)
    assert parse_scheme("gguf:q4_k_m").kind == "asym_min" and parse_scheme("gguf:q6_k").kind == "sym"
    assert not parse_scheme("gguf:q4_1").include_zero and parse_scheme("gguf:q4_k").include_zero  # llama.cpp's ranges


def test_a_q4_1_model_is_reproduced_exactly():
    """Weights already on a Q4_1 grid (the embedded SmolLM2 is a Q4_1 file) round back to themselves."""
    g = torch.Generator().manual_seed(3)
    d = (torch.rand(16, 16, 1, generator=g) * 0.01 + 1e-3).half().float()
    m = (torch.randn(16, 16, 1, generator=g) * 0.05).half().float()
    q = torch.randint(0, 16, (16, 16, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # every block spans the grid, as a Q4_1 block does
    w = (d * q + m).reshape(16, 512)
    assert torch.equal(quantize_weight(w, parse_scheme("gguf:q4_1")).dequantize(), w)
    assert not torch.equal(quantize_weight(w, parse_scheme("gguf:q4_1-asym")).dequantize(), w)


@pytest.mark.parametrize("name", WITH_MINS)
def test_offsets_are_fp16_dmin_times_small_integers(name):
    t = GGUF_TYPES[name]
    record = quantize_weight(_off_centre(), parse_scheme(f"gguf:{name}"))
    assert record.zero.dtype == torch.float32 and bool((record.zero >= 0).all())
    offsets = record.zero.reshape(-1, t.block // t.group)
    dmin, mins = split_double_quant_min(offsets, t.sub_scale_max)
    assert torch.equal(dmin.half().float(), dmin) and bool((mins >= 0).all() and (mins <= t.sub_scale_max).all())
    assert torch.equal(dmin[:, None] * mins, offsets)


@pytest.mark.parametrize("name", list(INTEGER_ZERO))
def test_the_offset_grid_beats_the_integer_zero_one_and_both_pack_exactly(name):
    w = _off_centre(1)
    errors = {}
    for suffix in ("", INTEGER_ZERO[name]):
        scheme = parse_scheme(f"gguf:{name}{suffix}")
        record = quantize_weight(w, scheme)
        assert torch.equal(record.dequantize(), fake_quant(w, scheme))
        decoded = gguf.quants.dequantize(pack_record(record), gguf.GGMLQuantizationType[name.upper()])
        assert np.array_equal(decoded, record.dequantize().numpy())
        errors[suffix] = float(((record.dequantize() - w) ** 2).sum())
    margin = 0.8 if GGUF_TYPES[name].double_quant else 0.97  # K-quants' sym grid wastes a level and the offset
    assert errors[""] < margin * errors[INTEGER_ZERO[name]]


def test_pack_refuses_offsets_off_the_grid():
    record = quantize_weight(_off_centre(), parse_scheme("gguf:q4_k"))
    record.zero[0, 0] = record.zero[0, 0] * 1.001 + 1e-4
    with pytest.raises(LowbitError, match="not on the GGUF q4_k grid"):
        pack_record(record)


@pytest.mark.parametrize("make", [lambda: QuantScheme(4, 32, "asym_min"), lambda: parse_scheme("gguf:q6_k-asym_min"),
                                  lambda: parse_scheme("gguf:q4_0-asym_min")])  # fmt: skip
def test_asym_min_is_only_a_k_quant_kind(make):
    with pytest.raises(LowbitError):
        make()


def test_mix_sym_suffix_reaches_the_k_quants_with_mins_only():
    model = make_mixed_llama()
    arch = arch_for(model)
    default = mix_schemes(model, arch, parse_scheme("gguf:q4_k_m"))
    sym = mix_schemes(model, arch, parse_scheme("gguf:q4_k_m-sym"))
    kinds = {(s.gguf, s.kind) for s in default.values()}
    assert ("q4_k", "asym_min") in kinds and ("q6_k", "sym") in kinds and ("q5_0", "sym_full") in kinds
    assert {(s.gguf, s.kind) for s in sym.values()} == {(g, "sym" if g == "q4_k" else k) for g, k in kinds}


def test_hqq_refuses_offsets_before_loading():
    with pytest.raises(LowbitError, match="gguf:q4_k-sym"):
        lowbit.quantize(model="/nonexistent", recipe="hqq", scheme="gguf:q4_k")


def test_a_run_on_the_grid_decodes_exactly_in_llama_cpp_order(tmp_path, tokenizer, text_file):
    from lowbit.formats.files import GGUF_FILE
    from lowbit.run import ExportSettings
    from test_export_gguf import _check_file_decodes_to_the_records, make_wide_llama

    source = save_model_dir(tmp_path / "src", make_wide_llama(), tokenizer)
    result = lowbit.quantize_to(tmp_path / "out", model=str(source), recipe="awq+imatrix", scheme="gguf:q4_k",
                                dataset=str(text_file), nsamples=4, seqlen=32,
                                export=ExportSettings(format="gguf"))  # fmt: skip
    _check_file_decodes_to_the_records(result, tmp_path / "out" / GGUF_FILE)
