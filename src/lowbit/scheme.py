"""Quantization schemes: bit width, grouping, quantizer kind and scale dtype (see docs/methods.md).

A `QuantScheme` is validated when it is built, so every later stage can trust it. Named presets and
the `w<bits>[a<act bits>][g<group>][-kind]` pattern map user strings onto schemes. `act_bits` < 16 makes a
weight-activation scheme: dynamic per-token asymmetric activations (docs/methods.md, OmniQuant).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.formats.gguf_types import GGUF_MIXES, GGUF_TYPES, GgufType, base_type

SCHEME_KINDS = ("asym", "sym", "sym_full", "sym_omni")
# GGUF's own grids (formats/gguf_types.py): offsets (Q4_1/Q5_1, K-quants with mins) and IQ4_NL's non-uniform levels
GGUF_ONLY_KINDS = ("asym_min", "nl")

_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# g accepts any signed integer so that QuantScheme names a bad group (w4g-2) instead of "unknown scheme"
_NAME_PATTERN = re.compile(r"w(\d)(?:a(\d+))?(?:g(-?\d+))?(?:-(sym|sym_full|sym_omni|asym))?")
_PATTERN_HELP = (
    "w<bits>g<group>[-sym|-sym_full|-sym_omni|-asym], e.g. w4g128, w4g-1 (per channel), w2g64-sym_full, or "
    "w<bits>a<act bits>[g<group>][-kind] for weight-activation schemes, e.g. w4a4, w6a6, w8a8 (per channel)"
)
ACT_BITS_OFF = 16  # activations stay in float
_ACT_BITS = (*range(2, 9), ACT_BITS_OFF)
W_A_PRESETS = ("w4a4", "w4a6", "w6a6", "w3a4", "w8a8")


def default_kind(bits: int, act_bits: int) -> str:
    """The weight kind a name without `-kind` means: asym, except W8A8, whose served int8 format is symmetric."""
    return "sym" if (bits, act_bits) == (8, 8) else "asym"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class QuantScheme:
    """One integer weight quantizer: b-bit unsigned codes, per-group scale and zero point."""

    bits: int = 4
    group_size: int = 128
    kind: str = "asym"
    include_zero: bool = True
    scale_dtype: str = "float16"
    act_bits: int = ACT_BITS_OFF
    gguf: str | None = None  # the GGUF block type the codes are stored as (formats/gguf_types.py), e.g. "q4_1"
    # a budgeted mixed-precision request "<bits>:<option>,<option>..." (`auto:` stripped): each linear gets one of the
    # options from a plan made before tuning (lowbit/mixed); the other fields are the widest option's
    auto: str | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.bits) or not 1 <= self.bits <= 8:
            raise LowbitError(f"bits={self.bits!r} is not supported: use an integer bit width from 1 to 8 (e.g. 4)")
        if not _is_int(self.group_size) or not (self.group_size == -1 or self.group_size >= 1):
            raise LowbitError(
                f"group_size={self.group_size!r} is not valid: use a positive group size (e.g. 128) "
                "or -1 for one group per output channel"
            )
        if self.kind not in (*SCHEME_KINDS, *GGUF_ONLY_KINDS):
            raise LowbitError(f"unknown scheme kind {self.kind!r}: use one of {', '.join(SCHEME_KINDS)}")
        if self.kind != "asym" and self.bits < 2:
            raise LowbitError(f"kind={self.kind!r} needs bits >= 2: use bits >= 2, or kind='asym' for 1-bit weights")
        if not isinstance(self.include_zero, bool):
            raise LowbitError(f"include_zero={self.include_zero!r} is not a bool: use True or False")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise LowbitError(f"unknown scale_dtype {self.scale_dtype!r}: use one of {', '.join(_SCALE_DTYPES)}")
        if not _is_int(self.act_bits) or self.act_bits not in _ACT_BITS:
            raise LowbitError(
                f"act_bits={self.act_bits!r} is not supported: use 2 to 8 for quantized activations, or 16 to keep "
                "them in float"
            )
        if self.kind == "asym_min" and self.gguf is None:
            raise LowbitError(
                "kind 'asym_min' is the offset grid of GGUF types (gguf:q4_1, q5_1, q2_k, q4_k, q5_k and their mixes): "
                "use kind 'asym' for other schemes"
            )
        if self.kind == "nl" and self.gguf is None:
            raise LowbitError("kind 'nl' is GGUF IQ4_NL's non-uniform grid (gguf:iq4_nl): use 'sym' for other schemes")
        if self.gguf is not None:
            _check_gguf(self)
        if self.auto is not None:
            _check_auto(self)

    @property
    def quantizes_activations(self) -> bool:
        """Whether block-linear inputs and attention operands are fake-quantized too (a W-A scheme)."""
        return self.act_bits < ACT_BITS_OFF

    @property
    def fp16_offset(self) -> bool:
        """Whether the offset s*z must be an fp16 value too (GGUF Q4_1/Q5_1 store it as one, formats/gguf_types)."""
        return self.gguf_type is not None and self.gguf_type.asymmetric

    @property
    def min_offset(self) -> bool:
        """Whether the zero is an offset in weight units, `w = s*c - z` (GGUF Q4_1/Q5_1: z = -m; K-quants with mins:
        z = dmin*m), not an integer code, `w = s*(c - z)`."""
        return self.kind == "asym_min"

    @property
    def codebook(self) -> tuple[int, ...] | None:
        """Non-uniform grids (kind `nl`, GGUF IQ4_NL): the level of each code, `w = s * codebook[c]`; else None."""
        t = self.gguf_type
        return t.codebook if self.kind == "nl" and t is not None else None

    @property
    def double_quant(self) -> tuple[int, int] | None:
        """K-quants: (groups per super-block, largest integer sub-scale); scales are d * sc (formats/gguf_types)."""
        t = self.gguf_type
        if t is None or not t.double_quant:
            return None
        return t.block // t.group, t.sub_scale_max

    @property
    def gguf_type(self) -> GgufType | None:
        """The GGUF type this scheme quantizes to (a mix's default type: each linear's own comes from the mix)."""
        return None if self.gguf is None else base_type(self.gguf)

    @property
    def gguf_mix(self) -> str | None:
        """The llama.cpp mix (q4_k_m, ...) whose per-linear types the run resolves before tuning, or None."""
        return self.gguf if self.gguf in GGUF_MIXES else None

    @property
    def mixed(self) -> MixedBudget | None:
        """The budget and options of an `auto:` scheme (its plan is made when the model is known), else None."""
        return None if self.auto is None else parse_budget(self.auto)

    @property
    def qmax(self) -> int:
        """Largest unsigned code, 2^b - 1."""
        return 2**self.bits - 1

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        """The dtype scales are stored in, and rounded through during fake quantization."""
        return _SCALE_DTYPES[self.scale_dtype]

    def num_groups(self, in_features: int) -> int:
        """Groups per row G; a partial last group counts as one."""
        _check_in_features(in_features)
        if self.group_size == -1:
            return 1
        return -(-in_features // self.group_size)

    def group_width(self, in_features: int) -> int:
        """Columns per (full) group: the whole row for per-channel schemes."""
        _check_in_features(in_features)
        return in_features if self.group_size == -1 else self.group_size

    @property
    def name(self) -> str:
        """Short name that `parse_scheme` reads back; include_zero and scale_dtype are not part of it.

        W-A schemes read `w4a4` (per channel) or `w4a4g128`; `-kind` is left out when it is `default_kind`.
        GGUF schemes read `gguf:q4_0` (`gguf:q4_0-sym_omni` for another kind than the type's default).
        """
        if self.auto is not None:
            return f"{AUTO_PREFIX}{self.auto}"
        if self.gguf is not None:
            suffix = "" if self.kind == base_type(self.gguf).kinds[0] else f"-{self.kind}"  # type: ignore[union-attr]
            return f"gguf:{self.gguf}{suffix}"
        if not self.quantizes_activations:
            suffix = "" if self.kind == "asym" else f"-{self.kind}"
            return f"w{self.bits}g{self.group_size}{suffix}"
        group = "" if self.group_size == -1 else f"g{self.group_size}"
        suffix = "" if self.kind == default_kind(self.bits, self.act_bits) else f"-{self.kind}"
        return f"w{self.bits}a{self.act_bits}{group}{suffix}"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields, for run records and checkpoint metadata (`gguf` only when set, so the records
        and fingerprints of other schemes stay as they were)."""
        d = asdict(self)
        for key in ("gguf", "auto"):
            if d[key] is None:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantScheme:
        """Inverse of `to_dict`; missing keys take their defaults, unknown keys are an error."""
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise LowbitError(f"unknown scheme key(s) {', '.join(unknown)}: use only {', '.join(allowed)}")
        return cls(**d)


def _check_in_features(in_features: int) -> None:
    if not _is_int(in_features) or in_features < 1:
        raise LowbitError(f"in_features={in_features!r} is not valid: pass the positive number of input columns")


def _check_gguf(scheme: QuantScheme) -> None:
    """A GGUF scheme must be the type's exact grid: its bits, block-size groups, a kind it stores, fp16 scales."""
    gguf_type = base_type(scheme.gguf) if isinstance(scheme.gguf, str) else None
    if gguf_type is None:
        raise LowbitError(f"unknown GGUF type {scheme.gguf!r}: use one of {', '.join([*GGUF_TYPES, *GGUF_MIXES])}")
    # group_size -1: a slice quantized as one group per row (GPTQ's and AWQ's per-group fits), same grid rules
    group = scheme.group_size if scheme.group_size != -1 else gguf_type.group
    expected = (gguf_type.bits, gguf_type.group, gguf_type.scale_dtype, ACT_BITS_OFF)
    actual = (scheme.bits, group, scheme.scale_dtype, scheme.act_bits)
    if actual != expected or scheme.kind not in gguf_type.kinds:
        raise LowbitError(
            f"GGUF {gguf_type.name} stores {gguf_type.bits}-bit weights in groups of {gguf_type.group} with "
            f"{gguf_type.scale_dtype} scales and float activations ({'/'.join(gguf_type.kinds)}), not "
            f"bits={scheme.bits} group_size={scheme.group_size} kind={scheme.kind} scale_dtype={scheme.scale_dtype} "
            f"act_bits={scheme.act_bits}: use --scheme gguf:{scheme.gguf}"
        )


def parse_gguf_scheme(text: str) -> QuantScheme:
    """`gguf:<type>[-kind]` (lower case, prefix stripped by the caller's `gguf:` test) -> the type's scheme."""
    body = text.split(":", 1)[1]
    name, _, kind = body.partition("-")
    gguf_type = base_type(name)
    if gguf_type is None:
        names = ", ".join(f"gguf:{t}" for t in (*GGUF_TYPES, *GGUF_MIXES))
        raise LowbitError(f"unknown GGUF type {name!r} in scheme {text!r}: use one of {names}")
    return gguf_type_scheme(gguf_type, kind or None, name)


def gguf_type_scheme(gguf_type: GgufType, kind: str | None = None, name: str | None = None) -> QuantScheme:
    """The exact scheme of a GGUF type (`name`: the type or a mix of it): `kind` (default: the type's first) on the
    type's grid. Q4_1/Q5_1's offsets grid takes the raw block range, as llama.cpp does (include_zero off)."""
    kind = kind or gguf_type.kinds[0]
    raw_range = kind == "asym_min" and not gguf_type.double_quant
    return QuantScheme(bits=gguf_type.bits, group_size=gguf_type.group, kind=kind, scale_dtype=gguf_type.scale_dtype,
                       include_zero=not raw_range, gguf=name or gguf_type.name)  # fmt: skip


AUTO_PREFIX = "auto:"
# g64 divides the in_features of nearly every model (SmolLM2's 576 included), so the default set exports everywhere
DEFAULT_AUTO_OPTIONS = ("w2g64", "w3g64", "w4g64", "w8g-1")
# how each linear x option is scored (lowbit/mixed/sensitivity.py): tr(E H E^T) from the block's X^T X,
# AutoScheme's first-order |grad * E| on the block's reconstruction loss, or on the model's language-model loss (lm:
# resident models only, so not the default, which must plan a streamed run as it plans a resident one; see docs)
ESTIMATORS = ("hessian", "gradient", "lm")


@dataclass(frozen=True)
class MixedBudget:
    """`auto:<bits>[:<options>][:<estimator>]`: at most `bits` stored bits per quantized weight on average (codes,
    scales, zeros and g_idx as the export stores them), each linear quantized with one of `options` (weight-only
    schemes), chosen by the sensitivities `estimator` measures."""

    bits: float
    options: tuple[QuantScheme, ...]
    estimator: str = ESTIMATORS[0]

    @property
    def text(self) -> str:
        """The canonical `<bits>:<options>[:<estimator>]` string a QuantScheme's `auto` field holds."""
        tail = "" if self.estimator == ESTIMATORS[0] else f":{self.estimator}"
        return f"{self.bits!r}:{','.join(option.name for option in self.options)}{tail}"

    def option(self, name: str) -> QuantScheme:
        """The option called `name` (a plan file names its choices), or a LowbitError listing the options."""
        for option in self.options:
            if option.name == name:
                return option
        raise LowbitError(f"scheme {name!r} is not an option of auto:{self.text}: use one of its options")


def parse_budget(text: str) -> MixedBudget:
    """`<bits>[:<option>,...][:<estimator>]` (no `auto:` prefix) -> MixedBudget; default options and estimator
    when none are named."""
    head, *rest = text.strip().lower().split(":")
    estimator = ESTIMATORS[0]
    if rest and rest[-1] in ESTIMATORS:
        estimator = rest.pop()
    tail = ":".join(rest)
    try:
        bits = float(head)
    except ValueError:
        bits = float("nan")
    if not bits > 0 or bits == float("inf"):
        raise LowbitError(
            f"auto scheme budget {head!r} is not a positive number of bits per weight: use e.g. auto:3.0 or "
            f"auto:3.0:{','.join(DEFAULT_AUTO_OPTIONS)}"
        )
    names = [name.strip() for name in tail.split(",")] if tail else list(DEFAULT_AUTO_OPTIONS)
    options: list[QuantScheme] = []
    for name in names:
        if name.startswith((AUTO_PREFIX, "gguf:")) or not name:
            raise LowbitError(f"auto scheme option {name!r} is not a plain weight scheme: use e.g. w3g128 or w4g64")
        option = parse_scheme(name)
        if option.quantizes_activations:
            raise LowbitError(f"auto scheme option {option.name} quantizes activations: use weight-only options")
        if option not in options:
            options.append(option)
    return MixedBudget(bits, tuple(options), estimator)


def _widest(options: tuple[QuantScheme, ...]) -> QuantScheme:
    """The option with the most bits (the first among equals): the scheme an `auto:` scheme reads as elsewhere."""
    return max(options, key=lambda option: option.bits)


def parse_auto_scheme(text: str) -> QuantScheme:
    """`auto:<bits>[:<options>]` -> a QuantScheme with `auto` set; its other fields are the widest option's."""
    budget = parse_budget(text[len(AUTO_PREFIX) :])
    return dataclasses.replace(_widest(budget.options), auto=budget.text)


def _check_auto(scheme: QuantScheme) -> None:
    """An `auto` field must parse (its other fields start as the widest option's; stages may derive variants, e.g.
    AWQ's search scheme with another include_zero, as of any scheme)."""
    parse_budget(scheme.auto)  # type: ignore[arg-type]


def _build_presets() -> dict[str, QuantScheme]:
    presets = {}
    for kind in ("asym", "sym", "sym_full"):
        for bits in (2, 3, 4, 8):
            for group_size in (32, 64, 128, -1):
                scheme = QuantScheme(bits=bits, group_size=group_size, kind=kind)
                presets[scheme.name] = scheme
    for name in W_A_PRESETS:
        scheme = parse_scheme(name)
        presets[scheme.name] = scheme
    return presets


def parse_scheme(text: str) -> QuantScheme:
    """Read a preset name or any `w<bits>g<group>[-kind]` / `w<bits>a<act>[g<group>][-kind]` string.

    Case-insensitive. `gguf:<type>` (q4_0 ... q8_0, q2_k ... q6_k) is a GGUF block type's exact scheme, `gguf:<mix>`
    (q2_k_s, q3_k_m, q4_k_s, q4_k_m, q5_k_m) llama.cpp's per-linear types, resolved when the model is known. With
    `a<act>` the group defaults to -1 (per channel, as OmniQuant's W-A settings);
    `a16` means float activations, so `w2a16g128` is `w2g128`.
    """
    key = str(text).strip().lower()
    if key.startswith(AUTO_PREFIX):
        return parse_auto_scheme(key)
    if key.startswith("gguf:"):
        return parse_gguf_scheme(key)
    if key in PRESETS:
        return PRESETS[key]
    match = _NAME_PATTERN.fullmatch(key)
    if match is None or (match.group(2) is None and match.group(3) is None):
        raise LowbitError(
            f"unknown scheme {text!r}: use a preset ({', '.join(PRESETS)}) or the pattern {_PATTERN_HELP}"
        )
    bits, act_bits, group_size, kind = match.groups()
    act = ACT_BITS_OFF if act_bits is None else int(act_bits)
    return QuantScheme(
        bits=int(bits),
        group_size=-1 if group_size is None else int(group_size),
        kind=kind or default_kind(int(bits), act),
        act_bits=act,
    )


PRESETS: dict[str, QuantScheme] = {}
PRESETS.update(_build_presets())
