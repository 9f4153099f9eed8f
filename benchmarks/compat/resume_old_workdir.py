"""Does a work directory written by an older lowbit still resume? (issue 29: the layout moves kept resume working)

Usage (the command behind benchmarks/results/resume-compat.json):
    git worktree add /tmp/lowbit-old 175c482 --detach   # the last commit before the layout moves (acc47df)
    python benchmarks/compat/resume_old_workdir.py --old-src /tmp/lowbit-old/src \
        --out benchmarks/results/resume-compat.json

For each recipe: the old code quantizes a tiny random Llama (3 blocks) and is interrupted right after block 1 is
checkpointed (as Ctrl-C would); this checkout then runs the same command with `--resume`, and a fresh run of this
checkout gives the reference. The row passes when the resumed export is byte-identical to the reference (the run
record and the model card excluded: they hold timings, memory and the export's name).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
NEW_SRC = HERE.parents[1] / "src"
RECIPES = {
    "gptq": [],
    "awq+rtn": ["awq.n_grid=4", "awq.clip_grid=4"],
    "signround": ["signround.iters=4", "signround.batch_size=2"],
    "omniquant": ["omniquant.epochs=1"],
}
SKIPPED = {"lowbit-run.json", "lowbit_record.json", "README.md"}  # run record (timings, either name), model card

# Run inside a child process: build the tiny model, then quantize, optionally interrupted after block `after`.
CHILD = r"""
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from lowbit.cli import main
from lowbit.engine import workdir

model_dir, text, out, recipe, interrupt, *extra = sys.argv[1:]
if not (__import__("pathlib").Path(model_dir) / "config.json").exists():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE()); tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>", "</s>"])
    tok.train_from_iterator([open(text).read()[:20000]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).eval().save_pretrained(model_dir); fast.save_pretrained(model_dir)
if interrupt == "yes":
    original = workdir.GroupCheckpoint.save_block
    def save_block(checkpoint, index, *args, **kwargs):
        original(checkpoint, index, *args, **kwargs)
        if index == 1:
            raise KeyboardInterrupt
    workdir.GroupCheckpoint.save_block = save_block
args = ["quantize", model_dir, "--recipe", recipe, "--scheme", "w4g32", "--dataset", text, "--nsamples", "4",
        "--seqlen", "32", "--opt", "engine.progress=false", "--out", out, *extra]
sys.exit(main(args))
"""


def quantize(src: Path, model_dir: Path, text: Path, out: Path, recipe: str, interrupt: bool, *extra: str) -> int:
    """One `lowbit quantize` with the lowbit found under `src`; returns its exit status."""
    opts = [arg for opt in RECIPES[recipe] for arg in ("--opt", opt)]
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = [sys.executable, "-c", CHILD, str(model_dir), str(text), str(out), recipe, "yes" if interrupt else "no"]
    return subprocess.run([*command, *opts, *extra], env=env, capture_output=True, text=True).returncode


def digest(directory: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.iterdir())
        if path.name not in SKIPPED
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-src", type=Path, required=True, help="the src/ folder of the older checkout")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    parser.add_argument("--keep", type=Path, help="an empty folder to keep the exports in (to look at them)")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated subset of the recipes")
    args = parser.parse_args()
    old_commit = subprocess.run(
        ["git", "-C", str(args.old_src), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        text = root / "corpus.txt"
        sentences = [
            "Quantization maps float weights to a few integer levels with a scale and a zero point.",
            "The block engine replays each decoder block on cached inputs, one batch at a time.",
            "Perplexity is the exponential of the mean negative log-likelihood over windows.",
        ]
        text.write_text("\n\n".join(f"{s} Paragraph {i}." for i in range(400) for s in sentences))
        model_dir = root / "model"
        for recipe in args.recipes.split(","):
            reference, out = root / f"ref-{recipe}", root / f"out-{recipe}"
            ref_status = quantize(NEW_SRC, model_dir, text, reference, recipe, False, "--no-checkpoint")
            old_status = quantize(args.old_src, model_dir, text, out, recipe, True)
            resume_status = quantize(NEW_SRC, model_dir, text, out, recipe, False, "--resume")
            ours, theirs = (digest(out), digest(reference)) if resume_status == ref_status == 0 else ({}, {})
            differ = sorted(name for name in ours.keys() | theirs.keys() if ours.get(name) != theirs.get(name))
            record = out / "lowbit_record.json"
            resumed = record.exists() and json.loads(record.read_text()).get("checkpoints", {}).get("resumed", False)
            rows.append({
                "recipe": recipe, "old_exit": old_status, "resume_exit": resume_status, "resumed": resumed,
                "byte_identical": resume_status == ref_status == 0 and not differ, "files_differing": differ,
            })  # fmt: skip
            print(rows[-1], flush=True)
    args.out.write_text(json.dumps({"old_commit": old_commit, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
