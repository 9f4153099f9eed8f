"""QuantScheme validation, naming, presets and parsing (spec: quantizer.md §1, §2)."""

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.scheme import PRESETS, SCHEME_KINDS, QuantScheme, parse_scheme


def test_defaults_are_w4g128_asym_with_zero_and_fp16_scales():
    scheme = QuantScheme()
    assert (scheme.bits, scheme.group_size, scheme.kind) == (4, 128, "asym")
    assert scheme.include_zero is True
    assert scheme.torch_scale_dtype == torch.float16
    assert scheme.qmax == 15
    assert scheme.name == "w4g128"


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"bits": 0}, "bits"),
        ({"bits": 9}, "bits"),
        ({"bits": 4.0}, "bits"),
        ({"bits": True}, "bits"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": -2}, "group_size"),
        ({"group_size": 1.5}, "group_size"),
        ({"kind": "nf4"}, "kind"),
        ({"kind": "sym", "bits": 1}, "bits >= 2"),
        ({"kind": "sym_full", "bits": 1}, "bits >= 2"),
        ({"kind": "sym_omni", "bits": 1}, "bits >= 2"),
        ({"scale_dtype": "float64"}, "scale_dtype"),
        ({"include_zero": "yes"}, "include_zero"),
    ],
)
def test_invalid_schemes_raise_one_line_error_naming_the_fix(kwargs, fragment):
    with pytest.raises(LowbitError) as info:
        QuantScheme(**kwargs)
    message = str(info.value)
    assert fragment in message
    assert "use" in message  # every message names the fix
    assert "\n" not in message


def test_one_bit_is_allowed_only_for_asym():
    assert QuantScheme(bits=1, group_size=64).qmax == 1


def test_scheme_is_frozen_and_hashable():
    scheme = QuantScheme()
    with pytest.raises(AttributeError):
        scheme.bits = 3  # type: ignore[misc]
    assert {scheme: 1}[QuantScheme()] == 1


@pytest.mark.parametrize(
    ("group_size", "in_features", "groups", "width"),
    [(-1, 576, 1, 576), (128, 1536, 12, 128), (128, 576, 5, 128), (64, 576, 9, 64), (7, 1, 1, 7), (1, 5, 5, 1)],
)
def test_num_groups_counts_a_partial_last_group(group_size, in_features, groups, width):
    scheme = QuantScheme(group_size=group_size)
    assert scheme.num_groups(in_features) == groups
    assert scheme.group_width(in_features) == width


def test_num_groups_rejects_non_positive_in_features():
    with pytest.raises(LowbitError):
        QuantScheme().num_groups(0)


@pytest.mark.parametrize(
    ("scheme", "name"),
    [
        (QuantScheme(4, 128), "w4g128"),
        (QuantScheme(4, -1), "w4g-1"),
        (QuantScheme(3, 128, "sym"), "w3g128-sym"),
        (QuantScheme(2, 128, "sym_full"), "w2g128-sym_full"),
        (QuantScheme(4, 32, "sym_omni"), "w4g32-sym_omni"),
    ],
)
def test_name(scheme, name):
    assert scheme.name == name


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_torch_scale_dtype(dtype):
    assert QuantScheme(scale_dtype=dtype).torch_scale_dtype == getattr(torch, dtype)


def test_presets_cover_the_required_grid_and_are_keyed_by_name():
    for bits in (2, 3, 4, 8):
        for group in (32, 64, 128, -1):
            for suffix in ("", "-sym", "-sym_full"):
                assert f"w{bits}g{group}{suffix}" in PRESETS
    for name, scheme in PRESETS.items():
        assert scheme.name == name


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parse_scheme_round_trips_every_preset(name):
    scheme = parse_scheme(name)
    assert scheme == PRESETS[name]
    assert parse_scheme(scheme.name) == scheme
    assert parse_scheme(name.upper()) == scheme


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("w4g96", QuantScheme(4, 96)),
        ("W3G-1-SYM", QuantScheme(3, -1, "sym")),
        ("w2g576-sym_full", QuantScheme(2, 576, "sym_full")),
        ("w4g128-sym_omni", QuantScheme(4, 128, "sym_omni")),
        ("w4g128-asym", QuantScheme(4, 128)),
        ("  w1g64 ", QuantScheme(1, 64)),
    ],
)
def test_parse_scheme_general_pattern(text, expected):
    assert parse_scheme(text) == expected


@pytest.mark.parametrize("text", ["", "int4", "w4", "w4g", "w16g128", "w4g128-nf", "w4g128 sym", "4bit"])
def test_parse_scheme_rejects_unknown_text_listing_presets_and_pattern(text):
    with pytest.raises(LowbitError) as info:
        parse_scheme(text)
    message = str(info.value)
    assert "w4g128" in message and "w<bits>g<group>" in message
    assert "\n" not in message


@pytest.mark.parametrize("text", ["w9g128", "w0g128", "w4g0", "w1g128-sym", "w1g64-sym_full"])
def test_parse_scheme_validates_pattern_matches(text):
    with pytest.raises(LowbitError):
        parse_scheme(text)


def test_dict_round_trip():
    for kind in SCHEME_KINDS:
        scheme = QuantScheme(3, 64, kind, include_zero=False, scale_dtype="bfloat16")
        data = scheme.to_dict()
        assert data == {
            "bits": 3,
            "group_size": 64,
            "kind": kind,
            "include_zero": False,
            "scale_dtype": "bfloat16",
            "act_bits": 16,
        }
        assert QuantScheme.from_dict(data) == scheme


def test_from_dict_defaults_missing_keys_and_rejects_unknown_ones():
    assert QuantScheme.from_dict({"bits": 8}) == QuantScheme(bits=8)
    with pytest.raises(LowbitError, match="sym"):
        QuantScheme.from_dict({"bits": 4, "sym": True})
    with pytest.raises(LowbitError):
        QuantScheme.from_dict({"bits": 12})


# ----------------------------------------------------------------------------------------------------------
# weight-activation schemes (omniquant.md §7)


@pytest.mark.parametrize(
    ("text", "expected", "name"),
    [
        ("w4a4", QuantScheme(4, -1, act_bits=4), "w4a4"),
        ("w4a6", QuantScheme(4, -1, act_bits=6), "w4a6"),
        ("w6a6", QuantScheme(6, -1, act_bits=6), "w6a6"),
        ("w3a4", QuantScheme(3, -1, act_bits=4), "w3a4"),
        ("w8a8", QuantScheme(8, -1, "sym", act_bits=8), "w8a8"),  # served int8 weights are symmetric
        ("w8a8-asym", QuantScheme(8, -1, "asym", act_bits=8), "w8a8-asym"),
        ("W4A4G128-SYM", QuantScheme(4, 128, "sym", act_bits=4), "w4a4g128-sym"),
        ("w4a8g-1", QuantScheme(4, -1, act_bits=8), "w4a8"),
        ("w2a16g128", QuantScheme(2, 128), "w2g128"),  # a16 = float activations
        ("w4a16", QuantScheme(4, -1), "w4g-1"),
    ],
)
def test_parse_w_a_schemes_and_round_trip_their_names(text, expected, name):
    scheme = parse_scheme(text)
    assert scheme == expected
    assert scheme.name == name
    assert parse_scheme(scheme.name) == scheme
    assert scheme.quantizes_activations == (scheme.act_bits < 16)


def test_w_a_presets_and_dict_round_trip():
    for name in ("w4a4", "w4a6", "w6a6", "w3a4", "w8a8"):
        assert PRESETS[name].quantizes_activations
        assert PRESETS[name].group_size == -1
        assert QuantScheme.from_dict(PRESETS[name].to_dict()) == PRESETS[name]
    assert parse_scheme("w2a16g128") == parse_scheme("w2g128")
    assert QuantScheme.from_dict({"bits": 4}).act_bits == 16  # records written before act_bits existed


@pytest.mark.parametrize("act_bits", [0, 1, 9, 12, 32, 4.0, True])
def test_invalid_act_bits_are_refused(act_bits):
    with pytest.raises(LowbitError, match="act_bits"):
        QuantScheme(4, -1, act_bits=act_bits)


@pytest.mark.parametrize("text", ["w4a1", "w4a9", "w4a12"])
def test_parse_rejects_unsupported_activation_widths(text):
    with pytest.raises(LowbitError, match="act_bits"):
        parse_scheme(text)
