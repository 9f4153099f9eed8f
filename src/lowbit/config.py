"""One typed configuration under the CLI, the Python API and recipe files.

Precedence: stage defaults < recipe file < explicit arguments (CLI flags / `--opt`, or API keywords).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib
import yaml

from lowbit.engine import EngineOptions, Stage
from lowbit.engine.precision import EngineDtype, with_engine_dtype
from lowbit.errors import LowbitError
from lowbit.methods import RECIPE_PRESETS, STAGES
from lowbit.mixed.plan import SchemePlan
from lowbit.presets import expand_presets
from lowbit.scheme import QuantScheme, parse_scheme

ENGINE = "engine"
DEFAULTS = {
    "recipe": "rtn",
    "scheme": "w4g128",
    "dataset": "auto",
    "nsamples": 128,
    "seqlen": 512,
    "seed": 42,
}
FILE_KEYS = (*DEFAULTS, "options")


@dataclass(frozen=True)
class StageSpec:
    """One stage of a recipe with its typed options."""

    name: str
    options: Any

    @property
    def stage_class(self) -> type[Stage]:
        return STAGES[self.name]


@dataclass(frozen=True)
class QuantizeConfig:
    """Everything a quantization run depends on; recorded verbatim in the run record."""

    stages: tuple[StageSpec, ...]
    scheme: QuantScheme
    dataset: str = "auto"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 42
    engine: EngineOptions = field(default_factory=EngineOptions)
    dtype: str = "auto"  # engine.dtype, already applied to the stages' `autocast` options
    # an `auto:` scheme's per-linear choices read from --scheme-plan (None: the run plans them itself)
    scheme_plan: SchemePlan | None = None

    @property
    def recipe(self) -> str:
        return "+".join(spec.name for spec in self.stages)

    @property
    def needs_data(self) -> bool:
        planning = self.scheme.mixed is not None and self.scheme_plan is None  # the sensitivity pass reads data
        return planning or any(spec.stage_class.needs_data for spec in self.stages)

    @property
    def act_order_groups(self) -> bool:
        """Whether a GPTQ stage quantizes in act-order with groups that follow it (its records carry a g_idx)."""
        return any(
            spec.name == "gptq" and spec.options.act_order and not spec.options.static_groups for spec in self.stages
        )

    def to_dict(self) -> dict[str, Any]:
        plan = {} if self.scheme_plan is None else {"scheme_plan": dict(self.scheme_plan.linears)}
        return {
            **plan,
            "recipe": self.recipe,
            "scheme": self.scheme.to_dict(),
            "dataset": self.dataset,
            "nsamples": self.nsamples,
            "seqlen": self.seqlen,
            "seed": self.seed,
            "options": {
                ENGINE: {**dataclasses.asdict(self.engine), "dtype": self.dtype},
                **{spec.name: dataclasses.asdict(spec.options) for spec in self.stages},
            },
        }


def _field_types(options_class: type) -> dict[str, Any]:
    return typing.get_type_hints(options_class)


def _coerce(value: Any, target: Any, where: str) -> Any:
    """Convert a CLI string (or a YAML/TOML value) to the option's declared type, or explain the problem."""
    origin = typing.get_origin(target)
    if origin in (typing.Union, types.UnionType):
        choices = [arg for arg in typing.get_args(target) if arg is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, choices[0], where)
    if origin is typing.Literal:
        allowed = typing.get_args(target)
        if value not in allowed:
            raise LowbitError(f"{where} must be one of {', '.join(map(str, allowed))}, got '{value}'")
        return value
    if target is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise LowbitError(f"{where} expects true or false, got '{value}'")
    if target in (int, float):
        try:
            number = target(value)
        except (TypeError, ValueError):
            raise LowbitError(f"{where} expects {target.__name__}, got '{value}'") from None
        if target is int and isinstance(value, float) and value != number:
            raise LowbitError(f"{where} expects an integer, got '{value}'")
        return number
    if target is str:
        return str(value)
    return value


def did_you_mean(word: str, choices: Any) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close: typos name their fix."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def build_options(options_class: type, values: Mapping[str, Any], owner: str) -> Any:
    """Instantiate an options dataclass from loose values, naming unknown options and bad types."""
    types_by_name = _field_types(options_class)
    unknown = sorted(set(values) - set(types_by_name))
    if unknown:
        valid = ", ".join(sorted(types_by_name)) or "none"
        hint = did_you_mean(unknown[0], types_by_name)
        raise LowbitError(f"unknown option '{owner}.{unknown[0]}'{hint}; options of '{owner}': {valid}")
    typed = {key: _coerce(value, types_by_name[key], f"option {owner}.{key}") for key, value in values.items()}
    return options_class(**typed)


def parse_opt(text: str) -> tuple[str, str, str]:
    """Split `STAGE.NAME=VALUE` (the `--opt` syntax)."""
    key, sep, value = text.partition("=")
    owner, dot, name = key.strip().partition(".")
    if not sep or not dot or not owner or not name:
        raise LowbitError(f"--opt expects STAGE.NAME=VALUE (e.g. engine.batch_size=4), got '{text}'")
    return owner.lower(), name, value.strip()


def opts_to_mapping(opts: list[str]) -> dict[str, dict[str, str]]:
    """Turn repeated `--opt` strings into {stage: {option: value}}."""
    mapping: dict[str, dict[str, str]] = {}
    for text in opts:
        owner, name, value = parse_opt(text)
        mapping.setdefault(owner, {})[name] = value
    return mapping


def parse_recipe(recipe: str) -> tuple[str, ...]:
    """Validate a recipe string like `teq+gptq`: known stages, transforms first, exactly one quantizer last."""
    names = tuple(part.strip().lower() for part in recipe.split("+") if part.strip())
    if not names:
        raise LowbitError("empty recipe; use e.g. --recipe rtn (see `lowbit recipes`)")
    for name in names:
        if name not in STAGES:
            hint = did_you_mean(name, STAGES)
            raise LowbitError(
                f"unknown stage '{name}' in recipe '{recipe}'{hint}; available: {', '.join(sorted(STAGES))}"
            )
    if {"teq", "awq"} <= set(names):
        raise LowbitError(
            f"recipe '{recipe}' combines teq and awq, which both set per-channel scales on the same groups; keep one"
        )
    kinds = [STAGES[name].kind for name in names]
    for name in dict.fromkeys(names):  # a stage may refuse the recipe around it (invarexplore's placement)
        check = getattr(STAGES[name], "check_recipe", None)
        if check is not None:
            check(names, kinds)
    if kinds[-1] != "quantizer" or kinds.count("quantizer") != 1:
        raise LowbitError(
            f"recipe '{recipe}' must end with exactly one quantizer stage "
            f"({', '.join(n for n, s in STAGES.items() if s.kind == 'quantizer')}), after any transforms"
        )
    return names


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or TOML recipe file into a plain dict, checking its keys."""
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"recipe file '{path}' does not exist")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise LowbitError(f"recipe file '{path}' is not valid {path.suffix.lstrip('.') or 'YAML'}: {error}") from None
    if not isinstance(data, dict):
        raise LowbitError(f"recipe file '{path}' must be a mapping with keys {', '.join(FILE_KEYS)}")
    unknown = sorted(set(data) - set(FILE_KEYS))
    if unknown:
        hint = did_you_mean(unknown[0], FILE_KEYS)
        raise LowbitError(f"recipe file '{path}': unknown key '{unknown[0]}'{hint}; allowed: {', '.join(FILE_KEYS)}")
    return data


def _scheme_from(value: Any) -> QuantScheme:
    if isinstance(value, QuantScheme):
        return value
    if isinstance(value, Mapping):
        try:
            return QuantScheme(**value)
        except TypeError as error:
            raise LowbitError(f"bad scheme mapping {dict(value)}: {error}") from None
    return parse_scheme(str(value))


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise LowbitError(f"--{name} must be at least 1, got {value}")
    return value


def _lacking(names: tuple[str, ...], capability: str) -> tuple[list[str], str]:
    """The stages of `names` whose class leaves the flag `capability` False, and every stage that has it (for the
    error message's alternative)."""
    unsupported = [name for name in names if not getattr(STAGES[name], capability)]
    able = ", ".join(name for name, stage in STAGES.items() if getattr(stage, capability))
    return unsupported, able


def _check_act_support(names: tuple[str, ...], scheme: QuantScheme) -> None:
    """A W-A scheme needs every stage to handle quantized activations; refuse before any model is loaded."""
    if not scheme.quantizes_activations:
        return
    unsupported, able = _lacking(names, "supports_act_quant")
    if unsupported:
        raise LowbitError(
            f"stage '{unsupported[0]}' does not support weight-activation scheme {scheme.name} "
            f"({scheme.act_bits}-bit activations): use a recipe of stages that do ({able}), or a weight-only "
            f"scheme such as w{scheme.bits}g{scheme.group_size}"
        )


def _check_mix_support(names: tuple[str, ...], scheme: QuantScheme) -> None:
    """A GGUF mix or an `auto:` plan gives each linear its own scheme: every stage must quantize with it
    (`Stage.scheme_for`)."""
    if scheme.gguf_mix is None and scheme.mixed is None:
        return
    unsupported, able = _lacking(names, "supports_scheme_mix")
    if unsupported and scheme.mixed is not None:
        raise LowbitError(
            f"stage '{unsupported[0]}' does not take per-linear schemes yet, which {scheme.name} needs: use a recipe "
            f"of {able}, or a uniform scheme"
        )
    if unsupported:
        raise LowbitError(
            f"stage '{unsupported[0]}' does not take per-linear types yet, which GGUF mix {scheme.name} needs: use a "
            f"recipe of {able}, or a single GGUF type such as gguf:{scheme.gguf_type.name}"  # type: ignore[union-attr]
        )


def build_config(
    *,
    recipe: str | None = None,
    scheme: str | QuantScheme | Mapping[str, Any] | None = None,
    dataset: str | None = None,
    nsamples: int | None = None,
    seqlen: int | None = None,
    seed: int | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    recipe_file: str | Path | None = None,
    scheme_plan: str | Path | SchemePlan | None = None,
) -> QuantizeConfig:
    """Merge defaults, an optional recipe file and explicit values into one validated config.

    `scheme_plan`: a plan.yaml an `auto:` run wrote (or its SchemePlan); its scheme is the run's scheme."""
    plan = SchemePlan.read(scheme_plan) if isinstance(scheme_plan, (str, Path)) else scheme_plan
    if plan is not None:
        if scheme is not None and _scheme_from(scheme).name != plan.scheme:
            raise LowbitError(f"--scheme {_scheme_from(scheme).name} differs from the plan's {plan.scheme}: pass "
                              "one of them")  # fmt: skip
        scheme = plan.scheme
    file_values = read_recipe_file(recipe_file) if recipe_file is not None else {}
    explicit = {
        "recipe": recipe,
        "scheme": scheme,
        "dataset": dataset,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
    }
    merged = {key: DEFAULTS[key] for key in DEFAULTS}
    merged.update({k: v for k, v in file_values.items() if k != "options"})
    merged.update({k: v for k, v in explicit.items() if v is not None})
    # Named presets (e.g. signround-fast) sit between the defaults and the recipe file.
    merged["recipe"], preset_top, preset_options = expand_presets(str(merged["recipe"]), RECIPE_PRESETS)
    for key, value in preset_top.items():
        if key not in file_values and explicit.get(key) is None:
            merged[key] = value

    option_values: dict[str, dict[str, Any]] = {}
    for source in (preset_options, file_values.get("options") or {}, options or {}):
        for owner, values in source.items():
            option_values.setdefault(str(owner).lower(), {}).update(values or {})

    names = parse_recipe(str(merged["recipe"]))
    unknown = sorted(set(option_values) - set(names) - {ENGINE})
    if unknown:
        raise LowbitError(
            f"options given for '{unknown[0]}', which is not in recipe '{merged['recipe']}' "
            f"(stages: {', '.join(names)}; plus 'engine')"
        )
    stages = tuple(
        StageSpec(name, build_options(STAGES[name].Options, option_values.get(name, {}), name)) for name in names
    )
    engine_values = dict(option_values.get(ENGINE, {}))
    dtype = _coerce(engine_values.pop("dtype", "auto"), EngineDtype, f"option {ENGINE}.dtype")
    stages = _with_engine_dtype(stages, dtype)
    engine = build_options(EngineOptions, engine_values, ENGINE)
    _positive("engine.batch_size", engine.batch_size)
    quant_scheme = _scheme_from(merged["scheme"])
    _check_act_support(names, quant_scheme)
    _check_mix_support(names, quant_scheme)
    for spec in stages:  # every option of an auto: scheme is one some linear may get
        for each in quant_scheme.mixed.options if quant_scheme.mixed else (quant_scheme,):
            spec.stage_class.validate(spec.options, each)
    return QuantizeConfig(
        stages=stages,
        scheme=quant_scheme,
        dataset=str(merged["dataset"]),
        nsamples=_positive("nsamples", int(merged["nsamples"])),
        seqlen=_positive("seqlen", int(merged["seqlen"])),
        seed=int(merged["seed"]),
        engine=engine,
        dtype=dtype,
        scheme_plan=plan,
    )


def _with_engine_dtype(stages: tuple[StageSpec, ...], dtype: str) -> tuple[StageSpec, ...]:
    """engine.dtype fills every `autocast` option left at "auto" (engine/precision.py states the precedence)."""
    return tuple(StageSpec(spec.name, with_engine_dtype(spec.options, dtype)) for spec in stages)


def describe_options(options_class: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for each option, for `lowbit recipes`."""
    rows = []
    hints = _field_types(options_class)
    for item in dataclasses.fields(options_class):
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        type_name = getattr(hints[item.name], "__name__", str(hints[item.name]))
        rows.append((item.name, type_name, default, item.metadata.get("help", "")))
    return rows
