"""GGUF export (issue 32): the scheme names, the grids (legacy and K-quant), the packing against gguf-py's own
decoder, and whole runs read back by gguf-py and by transformers (a third-party loader) on tiny random Llamas."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

import lowbit
from conftest import make_llama, make_opt, save_model_dir
from lowbit.errors import LowbitError
from lowbit.export.gguf.arch import gguf_arch
from lowbit.export.gguf.blocks import pack_record
from lowbit.export.gguf.embeddings import output_type, outside_types, shape_fallback
from lowbit.formats.files import GGUF_FILE
from lowbit.formats.gguf_types import GGUF_TYPES, base_type, fp16_offset_scale, split_double_quant
from lowbit.quantizer import fake_quant, quantize_weight
from lowbit.run import ExportSettings
from lowbit.scheme import QuantScheme, parse_scheme

LEGACY = [name for name, t in GGUF_TYPES.items() if not t.double_quant]
K_QUANTS = [name for name, t in GGUF_TYPES.items() if t.double_quant]
FILE_TYPES = {"q2_k": "MOSTLY_Q2_K", "q3_k": "MOSTLY_Q3_K_S", "q4_k": "MOSTLY_Q4_K_S", "q5_k": "MOSTLY_Q5_K_S"}
IDS = torch.arange(3, 43).unsqueeze(0)


# ----------------------------------------------------------------------------------------------------------
# types, schemes, grid


def test_gguf_type_table_matches_gguf_py():
    for t in GGUF_TYPES.values():
        qtype = gguf.GGMLQuantizationType[t.name.upper()]
        assert t.ggml_type == qtype.value
        assert gguf.GGML_QUANT_SIZES[qtype] == (t.block, t.type_size)
        assert t.file_type == gguf.LlamaFileType[FILE_TYPES.get(t.name, f"MOSTLY_{t.name.upper()}")].value
        assert t.block % t.group == 0


@pytest.mark.parametrize("name", list(GGUF_TYPES))
def test_gguf_scheme_names_parse_and_round_trip(name):
    scheme = parse_scheme(f"gguf:{name}")
    t = GGUF_TYPES[name]
    expected = (t.bits, t.group, t.kinds[0], "float32" if name in K_QUANTS else "float16")
    assert (scheme.bits, scheme.group_size, scheme.kind, scheme.scale_dtype) == expected
    assert scheme.name == f"gguf:{name}"
    assert parse_scheme(scheme.name.upper()) == scheme
    assert QuantScheme.from_dict(scheme.to_dict()) == scheme
    for kind in t.kinds[1:]:
        other = parse_scheme(f"gguf:{name}-{kind}")
        assert other.kind == kind and parse_scheme(other.name) == other


def test_other_schemes_keep_their_record_fields():
    assert "gguf" not in parse_scheme("w4g32").to_dict()  # run fingerprints of earlier runs stay valid


@pytest.mark.parametrize(
    "text,words",
    [
        ("gguf:q4_k-sym_full", ("q4_k", "sym", "--scheme gguf:q4_k")),
        ("gguf:q7_0", ("unknown GGUF type 'q7_0'",)),
        ("gguf:q4_1-sym", ("q4_1", "asym", "--scheme gguf:q4_1")),
    ],
)
def test_bad_gguf_scheme_names(text, words):
    with pytest.raises(LowbitError) as error:
        parse_scheme(text)
    for word in words:
        assert word in str(error.value)


def test_gguf_scheme_must_be_the_type_grid():
    with pytest.raises(LowbitError, match="groups of 32"):
        QuantScheme(bits=4, group_size=64, kind="sym_full", gguf="q4_0")
    with pytest.raises(LowbitError, match="float16 scales"):
        QuantScheme(bits=4, group_size=32, kind="asym", scale_dtype="bfloat16", gguf="q4_1")


def test_fp16_offset_scale_makes_the_offset_an_fp16_value():
    torch.manual_seed(0)
    scale = (torch.rand(4000) * 10 ** torch.empty(4000).uniform_(-4.9, 1)).half().float().clamp(min=1e-5)
    scale = scale.half().float()
    zero = torch.randint(0, 32, (4000,)).float()
    new = fp16_offset_scale(scale, zero)
    assert torch.equal(new.half().float(), new)  # still an fp16 scale
    assert torch.equal((new * zero).half().float(), new * zero)  # and s*z is an fp16 value
    assert float(((new - scale).abs() / scale).max()) <= 2**-6
    easy = (zero == 0) | (zero == 1) | (zero == 2) | (zero == 4) | (zero == 8) | (zero == 16)
    assert torch.equal(new[easy], scale[easy])  # nothing to do when the zero is 0 or a power of two


@pytest.mark.parametrize("scheme_name", [*(f"gguf:{n}" for n in GGUF_TYPES), "gguf:q4_0-sym_omni", "gguf:q8_0-sym",
                                         "gguf:q5_0-sym_omni"])  # fmt: skip
def test_packed_blocks_decode_to_the_record_exactly(scheme_name):
    scheme = parse_scheme(scheme_name)
    torch.manual_seed(1)
    magnitude = torch.logspace(-4.5, 1, 40)[:, None]  # tiny (subnormal fp16 scales) to large rows
    w = torch.randn(40, 512) * magnitude + torch.randn(40, 1) * magnitude  # rows off-centre: zeros away from 8
    w[3, :256] = 0  # an all-zero super-block: the smallest scales everywhere
    w[5, :16] *= 1e-4  # one sub-block far below its super-block's largest
    record = quantize_weight(w, scheme)
    assert torch.equal(record.dequantize(), fake_quant(w, scheme))  # what methods train against
    blocks = pack_record(record)
    qtype = gguf.GGMLQuantizationType[scheme.gguf.upper()]
    t = GGUF_TYPES[scheme.gguf]
    assert blocks.shape == (40, 512 // t.block * t.type_size)
    decoded = gguf.quants.dequantize(blocks, qtype)
    assert np.array_equal(decoded, record.dequantize().numpy())


def test_legacy_types_pack_what_gguf_py_quantizes_the_same_way():
    """Same bytes as gguf-py's own Q8_0 quantizer where both grids agree (d = amax/127 is not lowbit's rule, so the
    codes are compared through decoding; the layout is compared on a hand-made record)."""
    record = quantize_weight(torch.randn(2, 32), parse_scheme("gguf:q8_0"))
    blocks = pack_record(record)
    assert blocks[:, :2].view(np.float16).ravel().tolist() == record.scale.ravel().tolist()
    assert np.array_equal(blocks[:, 2:].view(np.int8), record.codes.numpy().astype(np.int16) - 128)


@pytest.mark.parametrize("name", K_QUANTS)
def test_k_quant_scales_are_fp16_d_times_small_integers(name):
    scheme = parse_scheme(f"gguf:{name}")
    t = GGUF_TYPES[name]
    torch.manual_seed(2)
    w = torch.randn(8, 512) * torch.logspace(-3, 0, 8)[:, None]
    scale = quantize_weight(w, scheme).scale.reshape(-1, t.block // t.group)
    d, sc = split_double_quant(scale, t.sub_scale_max)
    assert torch.equal(d.half().float(), d) and bool((sc >= 1).all()) and bool((sc <= t.sub_scale_max).all())
    assert torch.equal(d[:, None] * sc, scale)


def test_gptq_fits_k_quant_super_blocks_on_the_grid():
    from lowbit.methods.gptq.solve import gptq_quantize

    torch.manual_seed(3)
    w, x = torch.randn(16, 512), torch.randn(256, 512)
    for name in ("q4_k", "q6_k"):
        for static in (False, True):
            result = gptq_quantize(w, x.T @ x, parse_scheme(f"gguf:{name}"), act_order=static, static_groups=static)
            blocks = pack_record(result.record)  # raises unless every super-block is on the grid
            decoded = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[name.upper()])
            assert np.array_equal(decoded, result.record.dequantize().numpy())


def test_pack_refuses_records_off_the_grid():
    w = torch.randn(4, 64)
    with pytest.raises(LowbitError, match="not a GGUF type"):
        pack_record(quantize_weight(w, parse_scheme("w4g32")))
    record = quantize_weight(w, parse_scheme("gguf:q4_1-asym"))
    record.scale = (record.scale.float() * 1.0009765625).half()  # an off-grid scale: s*z no longer fp16
    record.zero[:] = 7
    with pytest.raises(LowbitError, match="offset"):
        pack_record(record)
    record = quantize_weight(w, parse_scheme("gguf:q4_1"))  # the offset grid: -z is the stored fp16 m
    record.zero[0, 0] = 0.1  # not an fp16 value
    with pytest.raises(LowbitError, match="offset"):
        pack_record(record)


# ----------------------------------------------------------------------------------------------------------
# whole runs


def make_wide_llama(seed: int = 0) -> torch.nn.Module:
    """Widths that are multiples of 256 (K-quant super-blocks), GQA 2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _source(tmp_path, tokenizer, make=make_llama):
    path = tmp_path / "src"
    if not path.exists():
        save_model_dir(path, make(), tokenizer)
    return path


def _run(tmp_path, tokenizer, scheme, recipe="rtn", text_file=None, **kwargs):
    data = {} if text_file is None else {"dataset": str(text_file), "nsamples": 4, "seqlen": 32}
    make = make_wide_llama if parse_scheme(scheme).double_quant else make_llama
    source = _source(tmp_path, tokenizer, make)
    return lowbit.quantize_to(tmp_path / "out", model=str(source), recipe=recipe, scheme=scheme,
                              export=ExportSettings(format="gguf"), **data, **kwargs)  # fmt: skip


def _check_file_decodes_to_the_records(result, path):
    reader = gguf.GGUFReader(path)
    arch = gguf_arch(result.model)
    tensors = {t.name: t for t in reader.tensors}
    state = result.model.state_dict()
    assert set(result.outside) == set(outside_types(result.model, result.config.scheme)) == {
        "model.embed_tokens", "lm_head"}  # fmt: skip
    for module, record in {**result.weights, **result.outside}.items():
        name = arch.tensor_name(f"{module}.weight")
        t = tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType[record.scheme.gguf.upper()]
        decoded = arch.unpermute_rows(name, gguf.quants.dequantize(t.data, t.tensor_type))
        assert np.array_equal(decoded, record.dequantize().numpy()), name
        assert np.array_equal(decoded, state[f"{module}.weight"].float().numpy()), name  # the evaluated weight
    default = base_type(result.config.scheme.gguf).name
    row = result.model.config.hidden_size  # untied: token_embd has the scheme's type, output Q6_K (or Q8_0)
    assert result.outside["model.embed_tokens"].scheme.gguf == shape_fallback(default, row)
    assert result.outside["lm_head"].scheme.gguf == output_type(default, row)
    for key in ("output_norm.weight", "blk.0.attn_norm.weight"):
        assert tensors[key].tensor_type == gguf.GGMLQuantizationType.F32


@pytest.mark.parametrize("scheme", [f"gguf:{n}" for n in GGUF_TYPES])
def test_rtn_export_decodes_exactly_and_loads_in_transformers(scheme, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    result = _run(tmp_path, tokenizer, scheme)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(["README.md", GGUF_FILE, "lowbit_record.json"])
    _check_file_decodes_to_the_records(result, out / GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = result.model(IDS).logits
        torch.testing.assert_close(loaded(IDS).logits, expected, rtol=0, atol=1e-6)
    for name, param in loaded.state_dict().items():  # the third-party loader sees exactly lowbit's weights
        assert torch.equal(param, result.model.state_dict()[name].float()), name


TUNED = [("gptq", "gguf:q4_0"), ("gptq", "gguf:q4_1"), ("awq+rtn", "gguf:q5_1"), ("signround", "gguf:q4_1"),
         ("omniquant", "gguf:q4_0-sym_omni"), ("gptq", "gguf:q4_k"), ("gptq", "gguf:q6_k"), ("signround", "gguf:q3_k"),
         ("awq+rtn", "gguf:q2_k"), ("teq+rtn", "gguf:q5_k"), ("signround", "gguf:q4_k"), ("imatrix", "gguf:q2_k"),
         ("gptq", "gguf:q5_k-sym"), ("omniquant", "gguf:q4_1"), ("gptq", "gguf:q5_1-asym"),
         ("signround", "gguf:q5_1-asym"), ("gptq", "gguf:iq4_nl"), ("signround", "gguf:iq4_nl"),
         ("awq+rtn", "gguf:iq4_nl"), ("imatrix", "gguf:iq4_nl"), ("teq+rtn", "gguf:iq4_nl")]  # fmt: skip


@pytest.mark.parametrize("recipe,scheme", TUNED)
def test_tuned_exports_decode_exactly(recipe, scheme, tmp_path, tokenizer, text_file):
    options = {}
    if recipe == "signround":
        options = {"signround": {"iters": 4}}
    if recipe == "omniquant":
        options = {"omniquant": {"epochs": 1}}
    if recipe == "teq+rtn":
        options = {"teq": {"steps": 2, "eval_samples": 2}}
    result = _run(tmp_path, tokenizer, scheme, recipe=recipe, text_file=text_file, options=options)
    _check_file_decodes_to_the_records(result, tmp_path / "out" / GGUF_FILE)


def test_metadata_and_tokenizer(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    _run(tmp_path, tokenizer, "gguf:q8_0")
    path = tmp_path / "out" / GGUF_FILE
    fields = gguf.GGUFReader(path).fields
    value = {key: fields[key].contents() for key in fields}
    assert value["general.architecture"] == "llama"
    assert value["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert value["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    assert value["llama.block_count"] == 2 and value["llama.embedding_length"] == 64
    assert value["llama.attention.head_count_kv"] == 4 and value["llama.rope.dimension_count"] == 16
    assert value["tokenizer.ggml.model"] == "gpt2" and value["tokenizer.ggml.pre"] == "gpt-2"
    assert json.loads(value["lowbit.scheme"])["gguf"] == "q8_0" and value["lowbit.recipe"] == "rtn"
    assert len(value["tokenizer.ggml.tokens"]) == 320

    reloaded = AutoTokenizer.from_pretrained(tmp_path / "out", gguf_file=GGUF_FILE)
    text = "<s>Quantization maps float weights</s> to 12 levels.\n"
    assert reloaded(text).input_ids == tokenizer(text).input_ids
    assert reloaded.decode(reloaded(text).input_ids) == text
    assert (reloaded.bos_token, reloaded.eos_token) == ("<s>", "</s>")

    record = json.loads((tmp_path / "out" / "lowbit_record.json").read_text())
    types = record["export"]["gguf_tensor_types"]
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == types["output.weight"] == "Q8_0"
    assert types["output_norm.weight"] == "F32" and record["gguf_outside"] == {"model.embed_tokens": "q8_0",
                                                                               "lm_head": "q8_0"}  # fmt: skip


def test_chat_template_is_written(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_source(tmp_path, tokenizer))
    tokenizer.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    tokenizer.save_pretrained(tmp_path / "src")
    _run(tmp_path, tokenizer, "gguf:q4_0")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "out", gguf_file=GGUF_FILE)
    assert reloaded.chat_template == tokenizer.chat_template


# ----------------------------------------------------------------------------------------------------------
# refusals before calibration


def _forbid_quantization(monkeypatch):
    def forbidden(*_args, **_kwargs):
        raise AssertionError("calibration started before the export was refused")

    monkeypatch.setattr("lowbit.run.run_quantization", forbidden)


def test_opt_family_is_refused_before_calibration(tmp_path, tokenizer, monkeypatch):
    _forbid_quantization(monkeypatch)
    source = _source(tmp_path, tokenizer, make_opt)
    with pytest.raises(LowbitError, match="model_type 'opt'.*--format compressed-tensors"):
        lowbit.quantize_to(tmp_path / "out", model=str(source), recipe="rtn", scheme="gguf:q4_0",
                           export=ExportSettings(format="gguf"))  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_width_not_a_multiple_of_the_block_is_refused_before_calibration(tmp_path, tokenizer, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    _forbid_quantization(monkeypatch)
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=80, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
    source = save_model_dir(tmp_path / "narrow", LlamaForCausalLM(config).eval(), tokenizer)
    with pytest.raises(LowbitError, match="in_features 80, not a multiple of the GGUF q4_0 block of 32"):
        lowbit.quantize_to(tmp_path / "out", model=str(source), recipe="rtn", scheme="gguf:q4_0",
                           export=ExportSettings(format="gguf"))  # fmt: skip


def test_auto_format_never_picks_gguf(tmp_path, tokenizer):
    result = lowbit.quantize_to(tmp_path / "out", model=str(_source(tmp_path, tokenizer)), recipe="rtn",
                                scheme="gguf:q4_0")  # fmt: skip
    assert result.record["format"] != "gguf"
    assert not (tmp_path / "out" / GGUF_FILE).exists()


def test_save_as_gguf_refuses_a_non_gguf_run(tmp_path, tokenizer):
    from lowbit.models import load_model

    result = lowbit.quantize(load_model(str(_source(tmp_path, tokenizer))), recipe="rtn", scheme="w4g32-sym_full")
    with pytest.raises(LowbitError, match="--scheme gguf:<type>"):
        result.save(tmp_path / "out", format="gguf")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# llama.cpp mixes


def make_mixed_llama(seed: int = 0) -> torch.nn.Module:
    """hidden 288 (a multiple of 32, not of 256: K types fall back), FFN 512 (ffn_down stays K), GQA 4, 4 layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=320, hidden_size=288, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512)  # fmt: skip
    return LlamaForCausalLM(config).eval()


MIXED = {  # hand-written from llama-quant.cpp's rules for 4 layers, GQA 4, rows of 288 (attn, gate/up) and 512 (down)
    "q4_k_m": {"attn_q": ["q5_0"] * 4, "attn_v": ["q5_0", "q5_0", "q8_0", "q8_0"],
               "ffn_down": ["q4_k", "q4_k", "q6_k", "q6_k"], "ffn_up": ["q5_0"] * 4},
    "q3_k_m": {"attn_v": ["q5_1", "q5_1", "q5_0", "q5_0"], "attn_output": ["q5_0"] * 4, "ffn_down": ["q4_k"] * 4,
               "attn_k": ["iq4_nl"] * 4},
    "q2_k_s": {"attn_v": ["q5_0"] * 4, "ffn_down": ["q2_k"] * 4, "ffn_gate": ["iq4_nl"] * 4},
}  # fmt: skip
KINDS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_down": "mlp.down_proj", "ffn_up": "mlp.up_proj",
         "ffn_gate": "mlp.gate_proj"}  # fmt: skip


@pytest.mark.parametrize("mix,recipe", [("q4_k_m", "rtn"), ("q4_k_m", "gptq"), ("q3_k_m", "gptq"), ("q2_k_s", "rtn"),
                                        ("q4_k_m", "signround")])  # fmt: skip
def test_mix_is_resolved_per_linear_before_tuning(mix, recipe, tmp_path, tokenizer, text_file):
    from transformers import AutoModelForCausalLM

    data = {} if recipe == "rtn" else {"dataset": str(text_file), "nsamples": 4, "seqlen": 32}
    if recipe == "signround":
        data["options"] = {"signround": {"iters": 4}}
    source = _source(tmp_path, tokenizer, make_mixed_llama)
    result = lowbit.quantize_to(tmp_path / "out", model=str(source), recipe=recipe, scheme=f"gguf:{mix}",
                                export=ExportSettings(format="gguf"), **data)  # fmt: skip
    for kind, types in MIXED[mix].items():
        got = [result.weights[f"model.layers.{i}.{KINDS[kind]}"].scheme.gguf for i in range(4)]
        assert got == types, kind
    path = tmp_path / "out" / GGUF_FILE
    _check_file_decodes_to_the_records(result, path)
    fields = gguf.GGUFReader(path).fields
    assert fields["general.file_type"].contents() == gguf.LlamaFileType[f"MOSTLY_{mix.upper()}"]
    record = json.loads((tmp_path / "out" / "lowbit_record.json").read_text())
    assert record["export"]["gguf_tensor_types"]["blk.3.ffn_down.weight"] == MIXED[mix]["ffn_down"][3].upper()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, result.model(IDS).logits, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# streamed runs


@pytest.mark.parametrize("scheme,recipe", [("gguf:q4_1", "rtn"), ("gguf:q4_k_m", "gptq"), ("gguf:q4_k_m", "imatrix")])
def test_streamed_run_writes_the_same_file_as_a_resident_one(scheme, recipe, tmp_path, tokenizer, text_file):
    """A streamed run starts the file from the shapes, writes each block as it finishes: the same tensors and metadata
    as a resident run (`lowbit.settings` names engine.stream, so that one key differs)."""
    make = make_mixed_llama if parse_scheme(scheme).gguf_mix else make_llama
    source = _source(tmp_path, tokenizer, make)
    data = {} if recipe == "rtn" else {"dataset": str(text_file), "nsamples": 4, "seqlen": 32}
    files = {}
    for stream in ("off", "on"):
        out = tmp_path / f"out-{stream}"
        result = lowbit.quantize_to(out, model=str(source), recipe=recipe, scheme=scheme,
                                    export=ExportSettings(format="gguf"), options={"engine": {"stream": stream}},
                                    **data)  # fmt: skip
        assert result.streamed == (stream == "on")
        reader = gguf.GGUFReader(out / GGUF_FILE)
        fields = {k: f.contents() for k, f in reader.fields.items() if k != "lowbit.settings"}
        files[stream] = (fields, [(t.name, t.tensor_type, t.data.tobytes()) for t in reader.tensors])
        record = json.loads((out / "lowbit_record.json").read_text())
        assert record["format"] == "gguf" and "blk.1.ffn_down.weight" in record["export"]["gguf_tensor_types"]
    assert files["on"][0] == files["off"][0]
    assert files["on"][1] == files["off"][1]


def test_streamed_gguf_run_cannot_resume(tmp_path, tokenizer):
    with pytest.raises(LowbitError, match="cannot resume"):
        lowbit.quantize_to(tmp_path / "out", model=str(_source(tmp_path, tokenizer)), recipe="rtn",
                           scheme="gguf:q4_0", export=ExportSettings(format="gguf", resume=True),
                           options={"engine": {"stream": "on"}})  # fmt: skip
