"""The integer quantizer family (spec: quantizer.md §12).

Expected values are written out literally or re-typed from the spec formulas; none is obtained by
calling the code under test.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.actquant import quantize_activation
from lowbit.errors import LowbitError
from lowbit.quantizer import (
    QuantizedWeight,
    compute_qparams,
    dequantize,
    fake_quant,
    quantize_codes,
    quantize_weight,
    round_ste,
)
from lowbit.scheme import SCHEME_KINDS, QuantScheme

KINDS_FOR_BITS = {bits: ("asym",) if bits == 1 else SCHEME_KINDS for bits in range(1, 9)}


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _f32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _per_column(params: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """[m, G] -> [m, k] by the plain column -> group map i // g (re-typed, not from lowbit)."""
    width = k if group_size == -1 else group_size
    return params[:, [i // width for i in range(k)]]


# ----------------------------------------------------------------------------------------------------------
# hand-computed tensors: every scheme at b = 2, 3, 4, 8 (§12)
#
# Scales are the fp16 values of the spec formulas, e.g. asym W1 at b = 2: lo = -1.25, hi = 2,
# s = fp16(3.25 / 3) = 1109/1024 = 1.0830078125, z = round(1.25 / s) = round(1.154) = 1, and
# 0.75 -> round(0.75 / s) + 1 = round(0.692) + 1 = 2.  sym_full W1 at b = 2: A_hi = 2 > A_lo = 1.25, so
# s = -2 / 2 = -1, z = 2, and 1.5 -> round(-1.5) + 2 = -2 + 2 = 0 (half to even).

W1 = [[-1.25, -0.5, -0.125, 0.0, 0.25, 0.75, 1.5, 2.0]]

# (kind, include_zero, bits, codes, scale, zero) for W1 with one group per row (group_size -1)
CASES_1X8 = [
    ("asym", True, 2, [0, 1, 1, 1, 1, 2, 2, 3], 1.0830078125, 1),
    ("asym", True, 3, [0, 2, 3, 3, 4, 5, 6, 7], 0.46435546875, 3),
    ("asym", True, 4, [0, 4, 5, 6, 7, 9, 13, 15], 0.2166748046875, 6),
    ("asym", True, 8, [0, 59, 88, 98, 118, 157, 216, 255], 0.01274871826171875, 98),
    ("asym", False, 2, [0, 1, 1, 1, 1, 2, 2, 3], 1.0830078125, 1),
    ("asym", False, 3, [0, 2, 3, 3, 4, 5, 6, 7], 0.46435546875, 3),
    ("asym", False, 4, [0, 4, 5, 6, 7, 9, 13, 15], 0.2166748046875, 6),
    ("asym", False, 8, [0, 59, 88, 98, 118, 157, 216, 255], 0.01274871826171875, 98),
    ("sym", True, 2, [1, 2, 2, 2, 2, 3, 3, 3], 1.3330078125, 2),
    ("sym", True, 3, [2, 3, 4, 4, 4, 5, 7, 7], 0.5712890625, 4),
    ("sym", True, 4, [3, 6, 8, 8, 9, 11, 14, 15], 0.2666015625, 8),
    ("sym", True, 8, [48, 96, 120, 128, 144, 176, 224, 255], 0.01568603515625, 128),
    ("sym_full", True, 2, [3, 2, 2, 2, 2, 1, 0, 0], -1.0, 2),
    ("sym_full", True, 3, [6, 5, 4, 4, 4, 2, 1, 0], -0.5, 4),
    ("sym_full", True, 4, [13, 10, 8, 8, 7, 5, 2, 0], -0.25, 8),
    ("sym_full", True, 8, [208, 160, 136, 128, 112, 80, 32, 0], -0.015625, 128),
    ("sym_omni", True, 2, [0, 1, 1, 1, 1, 1, 2, 2], 2.0, 1),
    ("sym_omni", True, 3, [1, 2, 3, 3, 3, 4, 5, 6], 0.66650390625, 3),
    ("sym_omni", True, 4, [3, 5, 7, 7, 8, 10, 12, 14], 0.28564453125, 7),
    ("sym_omni", True, 8, [48, 95, 119, 127, 143, 175, 222, 254], 0.0157470703125, 127),
]

# row 0: both signs in both groups (negative side dominant in group 0, positive in group 1);
# row 1: group 0 entirely positive, group 1 entirely negative (include_zero matters there).
W2 = [
    [-2.0, -1.5, -0.75, -0.25, 0.0, 0.5, 1.0, 1.25, -0.5, -0.375, 0.125, 0.625, 1.0, 1.875, 2.5, 3.0],
    [0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, -4.0, -3.5, -3.0, -2.0, -1.0, -0.5, -0.25, -0.125],
]

# (kind, include_zero, bits, codes row 0, codes row 1, scales [2, 2], zeros [2, 2]) for W2 with group_size 8
CASES_2X16 = [
    (
        "asym",
        True,
        2,
        [0, 1, 1, 2, 2, 2, 3, 3, 0, 0, 0, 1, 1, 2, 2, 3],
        [0, 0, 1, 1, 1, 2, 2, 3, 0, 0, 1, 1, 2, 3, 3, 3],
        [[1.0830078125, 1.1669921875], [1.3330078125, 1.3330078125]],
        [[2, 0], [0, 3]],
    ),
    (
        "asym",
        True,
        3,
        [0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 1, 2, 3, 5, 6, 7],
        [0, 1, 1, 2, 3, 4, 5, 7, 0, 1, 2, 3, 5, 6, 7, 7],
        [[0.46435546875, 0.5], [0.5712890625, 0.5712890625]],
        [[4, 1], [0, 7]],
    ),
    (
        "asym",
        True,
        4,
        [0, 2, 6, 8, 9, 11, 14, 15, 0, 0, 3, 5, 6, 10, 13, 15],
        [1, 2, 3, 4, 6, 8, 11, 15, 0, 2, 4, 7, 11, 13, 14, 15],
        [[0.2166748046875, 0.2332763671875], [0.2666015625, 0.2666015625]],
        [[9, 2], [0, 15]],
    ),
    (
        "asym",
        True,
        8,
        [0, 39, 98, 137, 157, 196, 235, 255, 0, 9, 45, 82, 109, 173, 218, 255],
        [16, 32, 48, 64, 96, 128, 191, 255, 0, 32, 64, 127, 191, 223, 239, 247],
        [[0.01274871826171875, 0.01372528076171875], [0.01568603515625, 0.01568603515625]],
        [[157, 36], [0, 255]],
    ),
    (
        "asym",
        False,
        2,
        [0, 1, 1, 2, 2, 2, 3, 3, 0, 0, 0, 1, 1, 2, 2, 3],
        [0, 0, 1, 1, 1, 2, 2, 3, 0, 0, 1, 1, 2, 3, 3, 3],
        [[1.0830078125, 1.1669921875], [1.25, 1.2919921875]],
        [[2, 0], [0, 3]],
    ),
    (
        "asym",
        False,
        3,
        [0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 1, 2, 3, 5, 6, 7],
        [0, 1, 1, 2, 3, 4, 6, 7, 0, 1, 2, 3, 5, 6, 7, 7],
        [[0.46435546875, 0.5], [0.53564453125, 0.5537109375]],
        [[4, 1], [0, 7]],
    ),
    (
        "asym",
        False,
        4,
        [0, 2, 6, 8, 9, 11, 14, 15, 0, 0, 3, 5, 6, 10, 13, 15],
        [1, 2, 3, 4, 6, 8, 12, 15, 0, 1, 3, 7, 11, 13, 14, 15],
        [[0.2166748046875, 0.2332763671875], [0.25, 0.25830078125]],
        [[9, 2], [0, 15]],
    ),
    (
        "asym",
        False,
        8,
        [0, 39, 98, 137, 157, 196, 235, 255, 0, 9, 45, 82, 109, 173, 218, 255],
        [17, 34, 51, 68, 102, 136, 204, 255, 0, 25, 58, 123, 189, 222, 239, 247],
        [[0.01274871826171875, 0.01372528076171875], [0.01470947265625, 0.01519775390625]],
        [[157, 36], [0, 255]],
    ),
    (
        "sym",
        True,
        2,
        [0, 1, 1, 2, 2, 2, 3, 3, 2, 2, 2, 2, 2, 3, 3, 3],
        [2, 2, 2, 2, 3, 3, 3, 3, 0, 1, 1, 1, 2, 2, 2, 2],
        [[1.3330078125, 2.0], [2.666015625, 2.666015625]],
        [[2, 2], [2, 2]],
    ),
    (
        "sym",
        True,
        3,
        [0, 1, 3, 4, 4, 5, 6, 6, 3, 4, 4, 5, 5, 6, 7, 7],
        [4, 4, 5, 5, 5, 6, 7, 7, 0, 1, 1, 2, 3, 4, 4, 4],
        [[0.5712890625, 0.85693359375], [1.142578125, 1.142578125]],
        [[4, 4], [4, 4]],
    ),
    (
        "sym",
        True,
        4,
        [0, 2, 5, 7, 8, 10, 12, 13, 7, 7, 8, 10, 11, 13, 14, 15],
        [8, 9, 9, 10, 11, 12, 14, 15, 0, 1, 2, 4, 6, 7, 8, 8],
        [[0.2666015625, 0.39990234375], [0.533203125, 0.533203125]],
        [[8, 8], [8, 8]],
    ),
    (
        "sym",
        True,
        8,
        [0, 32, 80, 112, 128, 160, 192, 208, 107, 112, 133, 155, 171, 208, 234, 255],
        [136, 144, 152, 160, 176, 192, 224, 255, 0, 16, 32, 64, 96, 112, 120, 124],
        [[0.01568603515625, 0.023529052734375], [0.0313720703125, 0.0313720703125]],
        [[128, 128], [128, 128]],
    ),
    (
        "sym_full",
        True,
        2,
        [0, 0, 1, 2, 2, 2, 3, 3, 2, 2, 2, 2, 1, 1, 0, 0],
        [2, 2, 2, 2, 1, 1, 0, 0, 0, 0, 0, 1, 2, 2, 2, 2],
        [[1.0, -1.5], [-2.0, 2.0]],
        [[2, 2], [2, 2]],
    ),
    (
        "sym_full",
        True,
        3,
        [0, 1, 2, 4, 4, 5, 6, 6, 5, 4, 4, 3, 3, 2, 1, 0],
        [4, 4, 3, 3, 2, 2, 1, 0, 0, 0, 1, 2, 3, 4, 4, 4],
        [[0.5, -0.75], [-1.0, 1.0]],
        [[4, 4], [4, 4]],
    ),
    (
        "sym_full",
        True,
        4,
        [0, 2, 5, 7, 8, 10, 12, 13, 9, 9, 8, 6, 5, 3, 1, 0],
        [8, 7, 6, 6, 5, 4, 2, 0, 0, 1, 2, 4, 6, 7, 8, 8],
        [[0.25, -0.375], [-0.5, 0.5]],
        [[8, 8], [8, 8]],
    ),
    (
        "sym_full",
        True,
        8,
        [0, 32, 80, 112, 128, 160, 192, 208, 149, 144, 123, 101, 85, 48, 21, 0],
        [120, 112, 104, 96, 80, 64, 32, 0, 0, 16, 32, 64, 96, 112, 120, 124],
        [[0.015625, -0.0234375], [-0.03125, 0.03125]],
        [[128, 128], [128, 128]],
    ),
    (
        "sym_omni",
        True,
        2,
        [0, 0, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1, 1, 2, 2, 2],
        [1, 1, 1, 1, 1, 1, 2, 2, 0, 0, 0, 1, 1, 1, 1, 1],
        [[2.0, 3.0], [4.0, 4.0]],
        [[1, 1], [1, 1]],
    ),
    (
        "sym_omni",
        True,
        3,
        [0, 1, 2, 3, 3, 4, 5, 5, 3, 3, 3, 4, 4, 5, 5, 6],
        [3, 3, 4, 4, 4, 5, 5, 6, 0, 0, 1, 1, 2, 3, 3, 3],
        [[0.66650390625, 1.0], [1.3330078125, 1.3330078125]],
        [[3, 3], [3, 3]],
    ),
    (
        "sym_omni",
        True,
        4,
        [0, 2, 4, 6, 7, 9, 11, 11, 6, 6, 7, 8, 9, 11, 13, 14],
        [7, 8, 8, 9, 10, 11, 12, 14, 0, 1, 2, 3, 5, 6, 7, 7],
        [[0.28564453125, 0.428466796875], [0.5712890625, 0.5712890625]],
        [[7, 7], [7, 7]],
    ),
    (
        "sym_omni",
        True,
        8,
        [0, 32, 79, 111, 127, 159, 191, 206, 106, 111, 132, 153, 169, 206, 233, 254],
        [135, 143, 151, 159, 175, 191, 222, 254, 0, 16, 32, 63, 95, 111, 119, 123],
        [[0.0157470703125, 0.02362060546875], [0.031494140625, 0.031494140625]],
        [[127, 127], [127, 127]],
    ),
]


def _check_record(record, codes, scale, zero):
    assert torch.equal(record.codes, torch.tensor(codes, dtype=torch.uint8))
    assert torch.equal(record.scale.float(), _f32(scale))
    assert torch.equal(record.zero, torch.tensor(zero, dtype=torch.int32))


@pytest.mark.parametrize(("kind", "include_zero", "bits", "codes", "scale", "zero"), CASES_1X8)
def test_hand_computed_1x8(kind, include_zero, bits, codes, scale, zero):
    scheme = QuantScheme(bits, -1, kind, include_zero)
    w = _f32(W1)
    record = quantize_weight(w, scheme)
    _check_record(record, [codes], [[scale]], [[zero]])
    expected_q = _f32([[scale * (c - zero) for c in codes]])
    assert torch.equal(record.dequantize(), expected_q)
    assert torch.equal(fake_quant(w, scheme), expected_q)
    s, z = compute_qparams(w, scheme)
    assert torch.equal(s, _f32([[scale]])) and torch.equal(z, _f32([[zero]]))


@pytest.mark.parametrize(("kind", "include_zero", "bits", "codes0", "codes1", "scale", "zero"), CASES_2X16)
def test_hand_computed_2x16(kind, include_zero, bits, codes0, codes1, scale, zero):
    scheme = QuantScheme(bits, 8, kind, include_zero)
    w = _f32(W2)
    record = quantize_weight(w, scheme)
    _check_record(record, [codes0, codes1], scale, zero)
    expected_q = _f32(
        [
            [scale[r][i // 8] * (c - zero[r][i // 8]) for i, c in enumerate(row)]
            for r, row in enumerate([codes0, codes1])
        ]
    )
    assert torch.equal(record.dequantize(), expected_q)
    assert torch.equal(fake_quant(w, scheme), expected_q)


def test_hand_computed_ties_round_half_to_even():
    # asym, include_zero, b = 3: lo = -2.5, hi = 4.5, s = 7 / 7 = 1 exactly, z = round(2.5) = 2.
    w = _f32([[-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 4.5]])
    record = quantize_weight(w, QuantScheme(3, -1))
    _check_record(record, [[0, 0, 2, 2, 4, 4, 6, 6]], [[1.0]], [[2]])
    assert torch.equal(record.dequantize(), _f32([[-2, -2, 0, 0, 2, 2, 4, 4]]))


def test_hand_computed_one_bit_asym():
    # b = 1: two levels, lo and hi.  lo = -1, hi = 3, s = 4, z = round(1 / 4) = 0: levels 0 and 4.
    w = _f32([[-1.0, 0.0, 1.0, 2.0, 2.5, 3.0]])
    record = quantize_weight(w, QuantScheme(1, -1))
    _check_record(record, [[0, 0, 0, 0, 1, 1]], [[4.0]], [[0]])


def test_scale_floor_and_constant_groups():
    # An all-zero group hits the 1e-5 floor (stored as fp16(1e-5)); a constant group reproduces itself.
    w = _f32([[0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    record = quantize_weight(w, QuantScheme(4, -1))
    assert record.scale[0, 0] == torch.tensor(1e-5, dtype=torch.float16)
    assert torch.equal(record.dequantize()[0], torch.zeros(4))
    # row 1: lo = 0, hi = 0.5, s = fp16(0.5 / 15), z = 0; 0.5 / s = 15.0 within fp16 rounding -> code 15
    assert torch.equal(record.codes[1], torch.full((4,), 15, dtype=torch.uint8))
    for kind in SCHEME_KINDS:
        assert bool(torch.isfinite(quantize_weight(torch.zeros(2, 8), QuantScheme(4, 4, kind)).scale.float()).all())
        quantize_weight(torch.zeros(2, 8), QuantScheme(4, 4, kind)).validate()


# ----------------------------------------------------------------------------------------------------------
# formula parity with the reference implementations, each re-typed from the spec (§12)


def _awq_reference(w, bits, group_size):
    """mit-han-lab/llm-awq pseudo_quantize_tensor (zero_point=True), fp32."""
    x = w.reshape(-1, group_size)
    max_val = x.amax(dim=1, keepdim=True)
    min_val = x.amin(dim=1, keepdim=True)
    max_int = 2**bits - 1
    scales = (max_val - min_val).clamp(min=1e-5) / max_int
    zeros = (-torch.round(min_val / scales)).clamp_(0, max_int)
    return ((torch.clamp(torch.round(x / scales) + zeros, 0, max_int) - zeros) * scales).reshape(w.shape)


def _gptq_reference(w, bits, group_size, sym):
    """IST-DASLab/gptq quant.py find_params + quantize, per group, fp32."""
    maxq = 2**bits - 1
    x = w.reshape(-1, group_size)
    tmp = torch.zeros(x.shape[0])
    xmin = torch.minimum(x.min(1)[0], tmp)
    xmax = torch.maximum(x.max(1)[0], tmp)
    if sym:
        xmax = torch.maximum(torch.abs(xmin), xmax)
        tmp = xmin < 0
        if torch.any(tmp):
            xmin[tmp] = -xmax[tmp]
    tmp = (xmin == 0) & (xmax == 0)
    xmin[tmp] = -1
    xmax[tmp] = +1
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    scale, zero = scale[:, None], zero[:, None]
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return (scale * (q - zero)).reshape(w.shape)


def _auto_round_reference(w, bits, group_size, v, min_scale, max_scale, sym):
    """intel/auto-round int.py quant_tensor_sym / quant_tensor_asym with scale_dtype fp16 and zero padding."""
    m, k = w.shape
    pad = -k % group_size
    x = torch.nn.functional.pad(w, (0, pad)).reshape(-1, group_size)
    v = torch.nn.functional.pad(v, (0, pad)).reshape(-1, group_size)
    wmin = torch.clamp(x.min(-1)[0], max=0) * min_scale.reshape(-1)
    wmax = torch.clamp(x.max(-1)[0], min=0) * max_scale.reshape(-1)
    if sym:
        maxq = 2 ** (bits - 1)
        max_v = (2 * (wmax < -wmin).int() - 1) * torch.max(wmax, -wmin)
        scale = (max_v / maxq).to(torch.float16)
        scale = torch.where(scale < 0, torch.clamp(scale, max=-1e-5), torch.clamp(scale, min=1e-5))
        zp = torch.full_like(scale, maxq)
    else:
        maxq = 2**bits - 1
        scale = ((wmax - wmin) / maxq).to(torch.float16)
        scale = torch.clamp(scale, min=1e-5)
        zp = torch.round(-wmin / scale)
    scale, zp = scale.unsqueeze(-1), zp.unsqueeze(-1)
    int_w = torch.round(x / scale + v)
    q = torch.clamp(int_w + zp, 0, 2**bits - 1)
    return (scale * (q - zp)).float().reshape(m, k + pad)[:, :k]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [16, 64])
def test_asym_raw_range_matches_awq(bits, group_size):
    w = _randn(32, 128, seed=bits) * 0.05 + 0.01
    scheme = QuantScheme(bits, group_size, "asym", include_zero=False, scale_dtype="float32")
    assert torch.equal(fake_quant(w, scheme), _awq_reference(w, bits, group_size))
    assert torch.equal(quantize_weight(w, scheme).dequantize(), _awq_reference(w, bits, group_size))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("kind", "sym"), [("sym", True), ("asym", False)])
def test_sym_and_asym_match_gptq(bits, kind, sym):
    w = _randn(32, 128, seed=10 + bits)
    scheme = QuantScheme(bits, 32, kind, include_zero=True, scale_dtype="float32")
    assert torch.equal(fake_quant(w, scheme), _gptq_reference(w, bits, 32, sym))


def test_sym_always_mirrors_the_range_unlike_gptq_on_positive_groups():
    # GPTQ keeps lo = 0 for a group with no negative entry; lowbit uses [-a, a] (§4 quirk).
    w = _f32([[0.5, 1.0, 2.0, 3.0]])
    scale, zero = compute_qparams(w, QuantScheme(4, -1, "sym", scale_dtype="float32"))
    assert torch.equal(scale, _f32([[2 * 3.0 / 15]]))
    assert torch.equal(zero, _f32([[8.0]]))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("kind", "sym"), [("sym_full", True), ("asym", False)])
@pytest.mark.parametrize("k", [64, 60])
def test_sym_full_and_asym_match_auto_round(bits, kind, sym, k):
    m, group_size = 16, 16
    groups = -(-k // group_size)
    w = _randn(m, k, seed=20 + bits) * 0.03
    v = torch.rand(m, k, generator=torch.Generator().manual_seed(1)) - 0.5
    gamma_lo = 0.5 + 0.5 * torch.rand(m, groups, generator=torch.Generator().manual_seed(2))
    gamma_hi = 0.5 + 0.5 * torch.rand(m, groups, generator=torch.Generator().manual_seed(3))
    scheme = QuantScheme(bits, group_size, kind)
    ours = fake_quant(w, scheme, v=v, gamma_hi=gamma_hi, gamma_lo=gamma_lo)
    theirs = _auto_round_reference(w, bits, group_size, v, gamma_lo, gamma_hi, sym)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_sym_omni_matches_omniquant_symmetric(bits):
    w = _randn(8, 64, seed=30 + bits)
    x = w.reshape(-1, 16)
    abs_max = torch.max(x.amax(1, keepdim=True).abs(), x.amin(1, keepdim=True).abs())
    scale = (abs_max / (2 ** (bits - 1) - 1)).clamp(min=1e-5)
    zero = 2 ** (bits - 1) - 1
    expected = (scale * (torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1) - zero)).reshape(w.shape)
    assert torch.equal(fake_quant(w, QuantScheme(bits, 16, "sym_omni", scale_dtype="float32")), expected)


# ----------------------------------------------------------------------------------------------------------
# sym_full sign rule and dominant extreme (§5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_sym_full_sign_rule_and_dominant_extreme_at_code_zero(bits):
    w = _randn(64, 64, seed=40 + bits)
    w[0, :16] = _f32([-1.0] + [0.5] * 14 + [1.0])  # a tie |min| == max: the scale is negative
    scheme = QuantScheme(bits, 16, "sym_full")
    record = quantize_weight(w, scheme)
    groups = w.reshape(64, 4, 16)
    lo, hi = groups.amin(-1), groups.amax(-1)
    negative_dominates = -lo > hi
    scale = record.scale.float()
    assert torch.equal(scale > 0, negative_dominates)
    assert torch.equal(scale < 0, ~negative_dominates)
    assert scale[0, 0] < 0
    dominant = torch.where(negative_dominates, groups.argmin(-1), groups.argmax(-1))
    codes = record.codes.reshape(64, 4, 16)
    assert bool((codes.gather(-1, dominant[..., None]) == 0).all())
    assert bool((record.zero == 2 ** (bits - 1)).all())


# ----------------------------------------------------------------------------------------------------------
# equivariance (§12)


@pytest.mark.parametrize("kind", SCHEME_KINDS)
@pytest.mark.parametrize("group_size", [-1, 16, 24])
def test_row_permutation_equivariance(kind, group_size):
    w = _randn(32, 80, seed=50)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(5))
    scheme = QuantScheme(3, group_size, kind)
    assert torch.equal(fake_quant(w[perm], scheme), fake_quant(w, scheme)[perm])


@pytest.mark.parametrize("kind", SCHEME_KINDS)
@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("c", [0.25, 0.5, 2.0, 16.0])
def test_power_of_two_scaling_equivariance(kind, scale_dtype, c):
    w = _randn(16, 80, seed=60) * 0.1
    scheme = QuantScheme(4, 16, kind, scale_dtype=scale_dtype)
    assert torch.equal(fake_quant(c * w, scheme), c * fake_quant(w, scheme))
    assert torch.equal(quantize_weight(c * w, scheme).codes, quantize_weight(w, scheme).codes)


# ----------------------------------------------------------------------------------------------------------
# straight-through estimator (§7)


def test_round_ste_forward_is_round_and_gradient_is_one():
    x = (_randn(1000, seed=70) * 10).requires_grad_()
    x.data[:4] = _f32([0.5, 1.5, -2.5, 3.5])
    y = round_ste(x)
    assert torch.equal(y, torch.round(x.detach()))
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, torch.ones_like(x))


def _clip_example():
    # asym b = 3, include_zero: lo = -1, hi = 3; gamma_hi = 0.5 clips the range to [-1, 1.5],
    # s = 2.5 / 7 ≈ 0.357, z = round(2.8) = 3.  2.9 maps to round(8.1) + 3 = 11 -> clipped to 7.
    w = _f32([[-1.0, -0.2, 0.1, 0.4, 0.9, 2.9, 3.0, 0.0]])
    inside, clipped = [1, 2, 3, 4, 7], [5]
    return w, QuantScheme(3, -1), torch.full((1, 1), 0.5), inside, clipped


def test_clamp_aware_clipped_weights_get_zero_gradient():
    w, scheme, gamma_hi, inside, clipped = _clip_example()
    w.requires_grad_()
    fake_quant(w, scheme, gamma_hi=gamma_hi).sum().backward()
    assert bool((w.grad[0, clipped] == 0).all())
    assert bool((w.grad[0, inside] == 1).all())  # s * (1 / s) through round_ste


def test_clamp_aware_gradients_reach_v_and_gamma():
    w, scheme, gamma_hi, inside, clipped = _clip_example()
    v = torch.zeros_like(w, requires_grad=True)
    gamma_hi = gamma_hi.clone().requires_grad_()
    gamma_lo = torch.ones(1, 1, requires_grad=True)
    fake_quant(w, scheme, v=v, gamma_hi=gamma_hi, gamma_lo=gamma_lo).sum().backward()
    scale, _ = compute_qparams(w, scheme, gamma_hi=gamma_hi.detach())
    assert bool((v.grad[0, clipped] == 0).all())
    assert torch.equal(v.grad[0, inside], scale[0, 0].expand(len(inside)))
    assert gamma_hi.grad is not None and gamma_hi.grad.abs().item() > 0
    assert gamma_lo.grad is not None and gamma_lo.grad.abs().item() > 0


def test_identity_ste_has_unit_gradient_and_constant_qparams():
    w, scheme, gamma_hi, _, _ = _clip_example()
    w.requires_grad_()
    gamma_hi = gamma_hi.clone().requires_grad_()
    v = torch.zeros_like(w, requires_grad=True)
    out = fake_quant(w, scheme, v=v, gamma_hi=gamma_hi, ste="identity")
    out.backward(torch.full_like(out, 3.0))
    assert torch.equal(w.grad, torch.full_like(w, 3.0))
    assert gamma_hi.grad is None and v.grad is None
    assert torch.equal(out, quantize_weight(w.detach(), scheme, gamma_hi=gamma_hi.detach()).dequantize())


def _lwc_reference(w, bits, gamma_hi, gamma_lo, zero_ste):
    """OmniQuant LWC / auto-round asym for one group per row, with or without STE on the zero's rounding."""
    qmax = 2**bits - 1
    hi = w.amax(1, keepdim=True) * gamma_hi
    lo = w.amin(1, keepdim=True) * gamma_lo
    scale = ((hi - lo) / qmax).clamp(min=1e-5).to(torch.float16).float()
    t = -lo / scale
    zero = (t + (torch.round(t) - t).detach() if zero_ste else torch.round(t).detach()).clamp(0, qmax)
    y = w / scale
    codes = (y + (torch.round(y) - y).detach() + zero).clamp(0, qmax)
    return scale * (codes - zero)


@pytest.mark.parametrize(("zero_grad", "zero_ste"), [("ste", True), ("none", False)])
def test_zero_grad_modes_match_their_reference_gradients(zero_grad, zero_ste):
    w = _randn(6, 32, seed=80)
    target = _randn(6, 32, seed=81)
    grads = []
    for fn in (
        lambda a, b: fake_quant(w, QuantScheme(4, -1, include_zero=False), gamma_hi=a, gamma_lo=b, zero_grad=zero_grad),
        lambda a, b: _lwc_reference(w, 4, a, b, zero_ste),
    ):
        a = torch.full((6, 1), 0.9, requires_grad=True)
        b = torch.full((6, 1), 0.8, requires_grad=True)
        ((fn(a, b) - target) ** 2).sum().backward()
        grads.append((a.grad, b.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_zero_grad_modes_differ_on_the_lower_clipping_factor():
    w = _randn(6, 32, seed=82)
    target = _randn(6, 32, seed=83)
    grads = []
    for zero_grad in ("ste", "none"):
        b = torch.full((6, 1), 0.8, requires_grad=True)
        q = fake_quant(w, QuantScheme(4, -1, include_zero=False), gamma_lo=b, zero_grad=zero_grad)
        ((q - target) ** 2).sum().backward()
        grads.append(b.grad)
    assert not torch.allclose(grads[0], grads[1])


# ----------------------------------------------------------------------------------------------------------
# activation quantizer (§9)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_activation_min_and_max_decode_within_half_a_step(bits):
    x = _randn(3, 5, 32, seed=90 + bits) * 4 + 1
    q = quantize_activation(x, bits)
    lo, hi = x.amin(-1), x.amax(-1)
    step = (hi - lo) / (2**bits - 1)
    q_lo = q.gather(-1, x.argmin(-1, keepdim=True)).squeeze(-1)
    q_hi = q.gather(-1, x.argmax(-1, keepdim=True)).squeeze(-1)
    assert bool(((q_lo - lo).abs() <= step / 2 * (1 + 1e-5)).all())
    assert bool(((q_hi - hi).abs() <= step / 2 * (1 + 1e-5)).all())
    assert bool(((q - x).abs() <= step[..., None] / 2 * (1 + 1e-5) + 1e-6).all())


def test_activation_positive_rows_and_dtype():
    x = torch.linspace(1.0, 2.0, 16).reshape(1, 16).to(torch.bfloat16)
    q = quantize_activation(x, 4)
    assert q.dtype == torch.bfloat16
    torch.testing.assert_close(q.float(), x.float(), atol=1 / 15 / 2 + 1e-2, rtol=0)


def test_activation_ste_gradient_and_identity_at_16_bits():
    x = _randn(4, 16, seed=95).requires_grad_()
    quantize_activation(x, 4).sum().backward()
    extremes = torch.zeros_like(x, dtype=torch.bool)
    extremes.scatter_(1, x.argmin(1, keepdim=True), True).scatter_(1, x.argmax(1, keepdim=True), True)
    assert bool((x.grad[~extremes] == 1).all())
    assert quantize_activation(x, 16) is x
    with pytest.raises(LowbitError):
        quantize_activation(x, 0)


# ----------------------------------------------------------------------------------------------------------
# partial last group (§1)


@pytest.mark.parametrize("kind", SCHEME_KINDS)
@pytest.mark.parametrize(("k", "group_size"), [(20, 8), (576, 128), (13, 5), (3, 8)])
def test_partial_group_equals_zero_padding_when_range_includes_zero(kind, k, group_size):
    w = _randn(6, k, seed=100) + 0.3
    padded = torch.nn.functional.pad(w, (0, -k % group_size))
    scheme = QuantScheme(4, group_size, kind, include_zero=True)
    assert torch.equal(fake_quant(w, scheme), fake_quant(padded, scheme)[:, :k])
    scale, zero = compute_qparams(w, scheme)
    scale_padded, zero_padded = compute_qparams(padded, scheme)
    assert torch.equal(scale, scale_padded) and torch.equal(zero, zero_padded)
    assert scale.shape == (6, -(-k // group_size))


def test_partial_group_without_zero_uses_only_its_own_columns():
    # last group [1, 2, 3, 4]: lo = 1, hi = 4, s = 3 / 15 = 0.2 (fp32 scales), z = clamp(round(-5), 0) = 0
    w = _f32([[-1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1.0, 2.0, 3.0, 4.0]])
    scheme = QuantScheme(4, 8, include_zero=False, scale_dtype="float32")
    scale, zero = compute_qparams(w, scheme)
    assert torch.equal(scale[0, 1], torch.tensor(3.0 / 15))
    assert zero[0, 1] == 0


def test_partial_group_gradient_reaches_the_last_column_once():
    w = _f32([[0.1, -0.3, 0.2, 0.05, 0.9]]).requires_grad_()
    v = torch.zeros_like(w, requires_grad=True)
    fake_quant(w, QuantScheme(4, 3, include_zero=False), v=v).sum().backward()
    assert v.grad.shape == w.shape and bool(torch.isfinite(w.grad).all())
    # the partial group [0.05, 0.9] has only its two columns; its min and max receive all of the qparam gradient
    w2 = w.detach()[:, 3:].clone().requires_grad_()
    fake_quant(w2, QuantScheme(4, -1, include_zero=False)).sum().backward()
    assert torch.equal(w.grad[:, 3:], w2.grad)


# ----------------------------------------------------------------------------------------------------------
# single columns (GPTQ) and g_idx (act-order)


@pytest.mark.parametrize("kind", SCHEME_KINDS)
def test_gptq_style_column_by_column_codes_match_the_whole_matrix(kind):
    w = _randn(8, 20, seed=110)
    scheme = QuantScheme(3, 8, kind)
    scale, zero = compute_qparams(w, scheme)
    full = quantize_codes(w, scale, zero, scheme)
    for j in range(3):
        block_scale, block_zero = compute_qparams(w[:, j * 8 : (j + 1) * 8], scheme)
        assert torch.equal(block_scale, scale[:, j : j + 1]) and torch.equal(block_zero, zero[:, j : j + 1])
        for i in range(j * 8, min(20, (j + 1) * 8)):
            column = quantize_codes(w[:, i : i + 1], block_scale, block_zero, scheme)
            assert torch.equal(column, full[:, i : i + 1])


def test_act_order_g_idx_matches_permuted_quantization():
    k, group_size = 20, 8
    w = _randn(4, k, seed=120)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(7))
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = torch.arange(k, dtype=torch.int32) // group_size
    scheme = QuantScheme(4, group_size)
    scale, zero = compute_qparams(w[:, perm], scheme)
    codes = quantize_codes(w, scale, zero, scheme, g_idx=g_idx)
    inverse = torch.argsort(perm)
    assert torch.equal(codes, quantize_codes(w[:, perm], scale, zero, scheme)[:, inverse])
    deq = dequantize(codes, scale, zero, group_size, g_idx)
    assert torch.equal(deq, dequantize(codes[:, perm], scale, zero, group_size)[:, inverse])
    record = QuantizedWeight(codes.to(torch.uint8), scale.half(), zero.int(), scheme, g_idx=g_idx)
    record.validate()
    assert torch.equal(record.dequantize(), deq)


def test_trivial_g_idx_equals_no_g_idx():
    w = _randn(4, 20, seed=121)
    record = quantize_weight(w, QuantScheme(4, 8))
    g_idx = torch.arange(20, dtype=torch.int32) // 8
    assert torch.equal(dequantize(record.codes, record.scale, record.zero, 8, g_idx), record.dequantize())


# ----------------------------------------------------------------------------------------------------------
# the QuantizedWeight record (§11)


def test_record_layout_and_state_round_trip():
    w = _randn(6, 20, seed=130)
    bias = _randn(6, seed=131)
    scheme = QuantScheme(3, 8, "sym_full", scale_dtype="bfloat16")
    record = quantize_weight(w, scheme, bias=bias)
    assert record.shape == (6, 20)
    assert record.codes.dtype == torch.uint8 and record.codes.shape == (6, 20)
    assert record.scale.dtype == torch.bfloat16 and record.scale.shape == (6, 3)
    assert record.zero.dtype == torch.int32 and record.zero.shape == (6, 3)
    assert record.g_idx is None and torch.equal(record.bias, bias)
    record.validate()
    state = record.state_dict()
    assert set(state) == {"codes", "scale", "zero", "bias"}
    restored = QuantizedWeight.from_state(state, QuantScheme.from_dict(scheme.to_dict()))
    assert torch.equal(restored.dequantize(), record.dequantize())
    with pytest.raises(LowbitError):
        QuantizedWeight.from_state({"codes": record.codes}, scheme)


def _corrupt(record, **changes):
    fields = {"codes": record.codes, "scale": record.scale, "zero": record.zero, "g_idx": record.g_idx}
    fields.update(changes)
    return QuantizedWeight(fields["codes"], fields["scale"], fields["zero"], record.scheme, fields["g_idx"])


@pytest.mark.parametrize(
    ("kind", "change", "message"),
    [
        ("asym", lambda r: {"codes": r.codes.clone().fill_(4)}, "codes exceed"),
        ("asym", lambda r: {"zero": r.zero.clone().fill_(-1)}, "zeros outside"),
        ("asym", lambda r: {"scale": r.scale.clone().fill_(0)}, "non-zero"),
        ("asym", lambda r: {"scale": r.scale.clone().fill_(float("inf"))}, "finite"),
        ("asym", lambda r: {"scale": -r.scale}, "negative scales"),
        ("sym", lambda r: {"zero": r.zero - torch.arange(r.zero.shape[1], dtype=torch.int32)}, "constant zero"),
        ("sym_omni", lambda r: {"zero": r.zero.clone().fill_(2)}, "constant zero"),
        ("asym", lambda r: {"scale": r.scale.float()}, "scale must be"),
        ("asym", lambda r: {"codes": r.codes.int()}, "codes must be"),
        ("asym", lambda r: {"zero": r.zero[:, :1]}, "zero must be"),
        ("asym", lambda r: {"g_idx": torch.zeros(20, dtype=torch.int32)}, "exactly"),
        ("asym", lambda r: {"g_idx": torch.arange(20) // 8}, "int32"),
    ],
)
def test_validate_rejects_broken_records(kind, change, message):
    record = quantize_weight(_randn(4, 20, seed=140), QuantScheme(2, 8, kind))
    record.validate()
    with pytest.raises(ValueError, match=message):
        _corrupt(record, **change(record)).validate()


# ----------------------------------------------------------------------------------------------------------
# bad inputs


def test_bad_inputs_raise_lowbit_error():
    scheme = QuantScheme(4, 8)
    w = _randn(4, 16, seed=150)
    scale, zero = compute_qparams(w, scheme)
    bad_calls = [
        lambda: compute_qparams(w[0], scheme),
        lambda: compute_qparams(w.long(), scheme),
        lambda: compute_qparams(w, scheme, gamma_hi=torch.ones(4, 3)),
        lambda: compute_qparams(w, scheme, zero_grad="sometimes"),
        lambda: fake_quant(w, scheme, ste="straight"),
        lambda: fake_quant(w, scheme, v=torch.zeros(4, 15)),
        lambda: quantize_codes(w, scale[:, :1].expand(4, 3), zero[:, :1].expand(4, 3), scheme),
        lambda: quantize_codes(w, scale, zero[:, :1], scheme),
        lambda: quantize_codes(w, scale, zero, scheme, g_idx=torch.full((16,), 5)),
        lambda: dequantize(torch.zeros(4, 16), scale, zero, 4),
        lambda: quantize_weight(torch.full((2, 8), float("nan")), scheme),
        lambda: quantize_weight(torch.full((2, 8), 1e7), scheme),
    ]
    for call in bad_calls:
        with pytest.raises(LowbitError) as info:
            call()
        assert "\n" not in str(info.value)


def test_scalar_and_row_clipping_factors_broadcast():
    w = _randn(4, 16, seed=151)
    scheme = QuantScheme(4, 8)
    full = fake_quant(w, scheme, gamma_hi=torch.full((4, 2), 0.75))
    assert torch.equal(fake_quant(w, scheme, gamma_hi=torch.tensor(0.75)), full)
    assert torch.equal(fake_quant(w, scheme, gamma_hi=torch.full((4, 1), 0.75)), full)


# ----------------------------------------------------------------------------------------------------------
# property tests


@st.composite
def quant_cases(draw):
    bits = draw(st.integers(1, 8))
    kind = draw(st.sampled_from(KINDS_FOR_BITS[bits]))
    m = draw(st.integers(1, 5))
    k = draw(st.integers(1, 40))
    divisors = [d for d in range(1, k + 1) if k % d == 0]
    non_divisors = [d for d in range(2, 2 * k + 2) if k % d != 0]
    group_size = draw(st.one_of(st.just(-1), st.sampled_from(divisors), st.sampled_from(non_divisors)))
    scheme = QuantScheme(
        bits,
        group_size,
        kind,
        include_zero=draw(st.booleans()),
        scale_dtype=draw(st.sampled_from(["float16", "bfloat16", "float32"])),
    )
    seed = draw(st.integers(0, 2**31 - 1))
    magnitude = draw(st.sampled_from([1e-3, 0.05, 1.0, 30.0]))
    pattern = draw(st.sampled_from(["normal", "positive", "negative", "constant", "zeros", "sparse"]))
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, k, generator=gen) * magnitude
    if pattern == "positive":
        w = w.abs() + magnitude
    elif pattern == "negative":
        w = -w.abs()
    elif pattern == "constant":
        w = torch.full((m, k), magnitude)
    elif pattern == "zeros":
        w = torch.zeros(m, k)
    elif pattern == "sparse":
        w = w * (torch.rand(m, k, generator=gen) < 0.2)
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    return scheme, w.to(dtype), gen


def _extras(draw_flags, scheme, w, gen):
    m, k = w.shape
    groups = scheme.num_groups(k)
    use_v, use_gamma = draw_flags
    v = torch.rand(m, k, generator=gen) - 0.5 if use_v else None
    gamma_hi = 0.3 + 0.7 * torch.rand(m, groups, generator=gen) if use_gamma else None
    gamma_lo = 0.3 + 0.7 * torch.rand(m, groups, generator=gen) if use_gamma else None
    return {"v": v, "gamma_hi": gamma_hi, "gamma_lo": gamma_lo}


PROPERTY_SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(quant_cases(), st.tuples(st.booleans(), st.booleans()), st.sampled_from(["clamp_aware", "identity"]))
def test_property_record_is_valid_and_dequantizes_to_fake_quant_exactly(case, flags, ste):
    scheme, w, gen = case
    extras = _extras(flags, scheme, w, gen)
    record = quantize_weight(w, scheme, **extras)
    record.validate()
    assert int(record.codes.max()) <= scheme.qmax
    assert torch.equal(record.dequantize(), fake_quant(w, scheme, ste=ste, **extras))


@PROPERTY_SETTINGS
@given(quant_cases())
def test_property_error_within_half_a_step_inside_the_clip_range(case):
    scheme, w, _ = case
    record = quantize_weight(w, scheme)
    m, k = w.shape
    w32 = w.float()
    s = _per_column(record.scale.float(), k, scheme.group_size)
    z = _per_column(record.zero.float(), k, scheme.group_size)
    ends = torch.stack([s * (0 - z), s * (scheme.qmax - z)])
    inside = (w32 >= ends.amin(0)) & (w32 <= ends.amax(0))
    error = (w32 - fake_quant(w, scheme)).abs()
    bound = s.abs() / 2 * (1 + 1e-5) + 1e-6 * w32.abs()
    assert bool((error <= bound)[inside].all())
