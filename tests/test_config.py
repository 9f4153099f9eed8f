import pytest

from lowbit.config import build_config, opts_to_mapping, parse_opt, parse_recipe
from lowbit.errors import LowbitError


def test_defaults():
    config = build_config()
    assert config.recipe == "rtn"
    assert config.scheme.name == "w4g128"
    assert (config.nsamples, config.seqlen, config.seed) == (128, 512, 42)
    assert config.engine.batch_size == 8 and config.engine.quantized_input


def test_opt_strings_are_typed_through_the_options_dataclass():
    config = build_config(options=opts_to_mapping(["engine.batch_size=4", "engine.quantized_input=false"]))
    assert config.engine.batch_size == 4
    assert config.engine.quantized_input is False


@pytest.mark.parametrize(
    ("opt", "message"),
    [
        ("engine.batch_size=four", "expects int"),
        ("engine.quantized_input=maybe", "expects true or false"),
        ("engine.nope=1", "unknown option 'engine.nope'"),
        ("signround.iters=5", "not in recipe"),
        ("engine.batch_size=0", "at least 1"),
    ],
)
def test_bad_options_are_named(opt, message):
    with pytest.raises(LowbitError, match=message):
        build_config(options=opts_to_mapping([opt]))


def test_parse_opt_requires_stage_dot_name():
    assert parse_opt("rtn.x=1") == ("rtn", "x", "1")
    with pytest.raises(LowbitError, match="STAGE.NAME=VALUE"):
        parse_opt("batch_size=4")


def test_recipe_validation():
    assert parse_recipe("RTN") == ("rtn",)
    with pytest.raises(LowbitError, match="unknown stage 'foo'"):
        parse_recipe("foo+rtn")
    with pytest.raises(LowbitError, match="exactly one quantizer"):
        parse_recipe("rtn+rtn")


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_recipe_file_is_overridden_by_explicit_values(tmp_path, suffix):
    path = tmp_path / f"recipe{suffix}"
    if suffix == ".yaml":
        path.write_text("recipe: rtn\nscheme: w3g64\nnsamples: 16\noptions:\n  engine:\n    batch_size: 2\n")
    else:
        path.write_text('recipe = "rtn"\nscheme = "w3g64"\nnsamples = 16\n[options.engine]\nbatch_size = 2\n')
    config = build_config(recipe_file=path, nsamples=32, options={"engine": {"quantized_input": "false"}})
    assert config.scheme.name == "w3g64"
    assert config.nsamples == 32
    assert config.engine.batch_size == 2 and config.engine.quantized_input is False


def test_recipe_file_errors(tmp_path):
    with pytest.raises(LowbitError, match="does not exist"):
        build_config(recipe_file=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipe: rtn\nbits: 4\n")
    with pytest.raises(LowbitError, match="unknown key 'bits'"):
        build_config(recipe_file=bad)


def test_scheme_mapping_and_bad_scheme():
    assert build_config(scheme={"bits": 2, "group_size": 64}).scheme.name == "w2g64"
    with pytest.raises(LowbitError):
        build_config(scheme="w9g128")
    with pytest.raises(LowbitError):
        build_config(scheme="w4g0")


def test_w_a_scheme_needs_stages_that_support_activation_quantization():
    assert build_config(recipe="rtn", scheme="w4a4").scheme.act_bits == 4
    assert build_config(recipe="gptq", scheme="w6a6").scheme.act_bits == 6
    for recipe in ("signround", "awq+rtn", "teq+gptq"):
        with pytest.raises(LowbitError, match=f"stage '{recipe.split('+')[0]}' does not support weight-activation"):
            build_config(recipe=recipe, scheme="w4a4")
    assert build_config(recipe="signround", scheme="w4a16g128").scheme.act_bits == 16
