"""Tiny random models (Llama-like and OPT, 2 blocks, hidden 64, FFN 256, 4 heads) and a tiny tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

TRAINING_TEXT = [
    "Quantization maps float weights to a few integer levels with a scale and a zero point.",
    "The block engine replays each decoder block on cached inputs, one batch at a time.",
    "Perplexity is the exponential of the mean negative log-likelihood over windows.",
] * 20


def make_tokenizer(
    corpus: list[str] = TRAINING_TEXT, vocab_size: int = 320, add_bos: bool = False, max_length: int | None = None
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences: needs no network, covers any text.

    `add_bos` prepends <s> once per call, like Llama's slow tokenizer.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<s>", "</s>"]
    )
    tokenizer.train_from_iterator(corpus, trainer)
    if add_bos:
        bos = tokenizer.token_to_id("<s>")
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    extra = {} if max_length is None else {"model_max_length": max_length}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", **extra)


def make_llama(vocab: int = 320, kv_heads: int = 4, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def make_opt(vocab: int = 320, seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=vocab,
        hidden_size=64,
        ffn_dim=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        max_position_embeddings=512,
        enable_bias=True,
    )
    return OPTForCausalLM(config).eval()


FAMILIES = {"llama": make_llama, "opt": make_opt}


@pytest.fixture(params=sorted(FAMILIES))
def tiny_model(request) -> torch.nn.Module:
    """A fresh tiny model of each supported family."""
    return FAMILIES[request.param]()


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def save_model_dir(path: Path, model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, tokenizer) -> Path:
    """The conftest tokenizer saved to a directory (synthetic checkpoints copy it in)."""
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama checkpoint directory with tokenizer (read-only for tests: copy before modifying)."""
    return save_model_dir(tmp_path_factory.mktemp("tiny-llama"), make_llama(), tokenizer)


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory, tokenizer) -> Path:
    return save_model_dir(tmp_path_factory.mktemp("tiny-opt"), make_opt(), tokenizer)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """A local text file long enough for tiny calibration and evaluation runs."""
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    paragraphs = [f"{sentence} Paragraph {i}." for i in range(400) for sentence in TRAINING_TEXT[:3]]
    path.write_text("\n\n".join(paragraphs))
    return path
