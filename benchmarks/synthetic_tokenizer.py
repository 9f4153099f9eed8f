"""A byte-level BPE tokenizer trained on the offline calibration text (CPython's pydoc topics), for synthetic
checkpoints: random weights need token ids below their vocabulary, not a real model's tokenizer.

    python benchmarks/synthetic_tokenizer.py --out /work/big/tokenizer --vocab 32000
"""

from __future__ import annotations

import argparse
from pathlib import Path


def write_tokenizer(out: Path, vocab: int) -> Path:
    """Train on the builtin text and save a transformers tokenizer (ids < `vocab`) into `out`."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<unk>", "<s>", "</s>"]
    )
    tokenizer.train_from_iterator(list(topics.values()), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    path = write_tokenizer(args.out, args.vocab)
    print(f"wrote a tokenizer to {path}")


if __name__ == "__main__":
    main()
