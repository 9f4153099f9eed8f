"""Write a synthetic checkpoint (seeded random weights, real config, sharded safetensors) for streaming runs.

Large checkpoints cannot be downloaded or built in RAM on the benchmark machine; this writes one tensor at a time,
so a 7B (`--preset llama2-7b`, ~13.5 GB in bf16) needs only disk. Pass `--tokenizer-dir` (with a matching
`--vocab`) to make the result loadable by lowbit end to end.

    python benchmarks/make_synthetic_checkpoint.py --out /tmp/llama2-7b-synth --preset llama2-7b
    python benchmarks/make_synthetic_checkpoint.py --out /tmp/tiny --family qwen3 --hidden 256 --layers 4
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from lowbit.synthetic import FAMILIES, parse_size, write_synthetic_checkpoint

logger = logging.getLogger(__name__)

PRESETS = {
    "llama2-7b": {"family": "llama", "hidden": 4096, "intermediate": 11008, "layers": 32, "heads": 32,
                  "kv_heads": 32, "vocab": 32000},
}  # fmt: skip
DEFAULTS = {"family": "llama", "hidden": 256, "intermediate": 688, "layers": 4, "heads": 4, "kv_heads": None,
            "vocab": 32000}  # fmt: skip
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    """The command line; model-shape options left unset come from --preset, else from DEFAULTS."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to create (must hold no weights)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named shape; explicit options override it")
    parser.add_argument("--family", choices=FAMILIES)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", type=int, help="default: --heads")
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--tie", action="store_true", help="tie lm_head to the input embeddings")
    parser.add_argument("--max-shard-size", default="5GB", help='largest shard, e.g. "2GB" or "500MB"')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-dir", type=Path, help="copy the tokenizer files from here")
    return parser


def resolve(args: argparse.Namespace) -> dict:
    """The shape options: explicit flags, then the preset, then DEFAULTS."""
    base = {**DEFAULTS, **PRESETS.get(args.preset or "", {})}
    shape = {key: getattr(args, key) if getattr(args, key) is not None else value for key, value in base.items()}
    if shape["kv_heads"] is None:
        shape["kv_heads"] = shape["heads"]
    return shape


def main(argv: list[str] | None = None) -> Path:
    """Parse `argv` and write the checkpoint; returns its directory."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    shape = resolve(args)
    out = write_synthetic_checkpoint(
        args.out, family=shape["family"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_layers=shape["layers"], num_heads=shape["heads"], num_kv_heads=shape["kv_heads"],
        vocab_size=shape["vocab"], dtype=DTYPES[args.dtype], tie_word_embeddings=args.tie,
        max_shard_bytes=parse_size(args.max_shard_size), seed=args.seed, tokenizer_dir=args.tokenizer_dir,
    )  # fmt: skip
    logger.info("synthetic checkpoint ready: %s", out)
    return out


if __name__ == "__main__":
    main()
