"""Write auto-round's own GGUF export of the embedded SmolLM2 (run with the auto-round venv's python, one process per
file); bench_gguf_llamacpp.py then runs the file in llama.cpp beside lowbit's.

auto-round is fed lowbit's calibration token windows (as [1, seqlen] tensors, so both tools calibrate on identical
tokens and auto-round never downloads its default dataset). `--iters 0` is auto-round's RTN with its imatrix-weighted
scale search (`disable_opt_rtn=False`, what its `opt_rtn` recipe runs); `--iters 50 --lr 5e-3` is its "light" recipe.
Prints one JSON line starting with RESULT.

    <auto-round venv>/bin/python benchmarks/peers/peer_autoround_gguf.py --format gguf:q4_k_m --iters 0 --out DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--format", required=True, help="auto-round's gguf format, e.g. gguf:q4_k_m")
    parser.add_argument("--iters", type=int, default=0)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=None, help="a local model directory (default: the embedded SmolLM2)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    import auto_round
    from auto_round import AutoRound

    from lowbit.data import load_calibration
    from lowbit.models import load_model

    loaded = load_model(args.model)
    calib = load_calibration(loaded.tokenizer, "builtin", nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    started = time.perf_counter()
    tuner = AutoRound(
        str(loaded.path),
        loaded.tokenizer,
        scheme=args.format.upper(),
        iters=args.iters,
        lr=args.lr,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        batch_size=args.batch_size,
        seed=args.seed,
        amp=False,
        dataset=[row[None].clone() for row in calib.input_ids],
        device_map="cpu",
        disable_opt_rtn=False,
    )
    tuner.quantize_and_save(str(args.out), format=args.format)
    seconds = time.perf_counter() - started
    files = sorted(str(p) for p in args.out.rglob("*.gguf"))
    row = {"tool": "auto-round", "version": auto_round.__version__, "format": args.format, "iters": args.iters,
           "lr": args.lr, "quantize_seconds": round(seconds, 1), "files": files,
           "calibration_sha256": calib.meta["sha256"]}  # fmt: skip
    print("RESULT " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
