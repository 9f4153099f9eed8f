"""Run PyPI auto-round on the embedded SmolLM2 (run with the auto-round venv's python, one process per run).

It is fed lowbit's own calibration token windows (as [1, seqlen] tensors, so both tools see identical tokens and
auto-round never tries to download its default dataset), tunes in fp32 (amp=False) or, with --amp, with auto-round's
default bf16 AMP on this CPU (its model is then bf16: the codes are recovered from its bf16 weights), then
rebuilds fp32 weights from its per-layer scale / zp: q = clamp(round(W/scale) + zp, 0, qmax), W = (q - zp) * scale
(its fake export is unreliable for an fp32 source; see shared/notes/peers-on-cpu.md). Prints one JSON line.

    <auto-round venv>/bin/python benchmarks/peers/peer_autoround.py --bits 2 --iters 50 --nsamples 64 --seqlen 512
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time

import torch


def rebuild_fp32(quantized: torch.nn.Module, fresh: torch.nn.Module, bits: int, group_size: int) -> int:
    """Copy auto-round's quantized linears into `fresh` (fp32) as dequantized codes; returns the count."""
    qmax = 2**bits - 1
    count = 0
    fresh_modules = dict(fresh.named_modules())
    for name, module in quantized.named_modules():
        if not hasattr(module, "scale") or not hasattr(module, "weight") or name not in fresh_modules:
            continue
        weight = module.weight.detach().float()
        m, k = weight.shape
        scale = module.scale.detach().float().reshape(m, -1)
        zp = torch.as_tensor(module.zp).detach().float().reshape(m, -1) if module.zp is not None else None
        width = k if group_size == -1 else group_size
        cols = torch.arange(k) // width
        s, z = scale[:, cols], zp[:, cols]
        codes = torch.clamp(torch.round(weight / s) + z, 0, qmax)
        with torch.no_grad():
            fresh_modules[name].weight.copy_((codes - z) * s)
        count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bits", type=int, required=True)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="auto-round's lr (default 1/iters)")
    parser.add_argument("--amp", action="store_true", help="auto-round's default AMP (bf16 on CPU) instead of fp32")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the whole run")
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N blocks (quick checks)")
    parser.add_argument("--eval-dataset", default="builtin")
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--eval-windows", type=int, default=None)
    parser.add_argument("--no-eval", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import auto_round
    from auto_round import AutoRound

    from lowbit.data import load_calibration, load_eval
    from lowbit.eval import perplexity
    from lowbit.models import load_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    loaded = load_model(None)
    fresh = load_model(None).model
    if args.layers is not None:
        for model in (loaded.model, fresh):
            model.model.layers = model.model.layers[: args.layers]
            model.config.num_hidden_layers = args.layers
    calib = load_calibration(loaded.tokenizer, "builtin", nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    windows = [row[None].clone() for row in calib.input_ids]
    started = time.perf_counter()
    tuner = AutoRound(
        loaded.model,
        loaded.tokenizer,
        bits=args.bits,
        group_size=args.group_size,
        sym=False,
        iters=args.iters,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        batch_size=args.batch_size,
        seed=args.seed,
        lr=args.lr,
        amp=args.amp,
        dataset=windows,
        device_map="cpu",
    )
    tuner.quantize()
    quantize_seconds = time.perf_counter() - started
    linears = rebuild_fp32(tuner.model, fresh, args.bits, args.group_size)
    row = {
        "tool": "auto-round",
        "version": auto_round.__version__,
        "quantize_seconds": round(quantize_seconds, 3),
        "linears": linears,
        "threads": torch.get_num_threads(),
        "amp": args.amp,
        "lr": args.lr,
        "calibration_sha256": calib.meta["sha256"],
        "peak_rss_after_quantize_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    tokenizer = loaded.tokenizer
    del tuner, loaded
    if not args.no_eval:
        data = load_eval(tokenizer, args.eval_dataset)
        ppl = perplexity(fresh, data.input_ids, seqlen=args.eval_seqlen, max_windows=args.eval_windows, progress=False)
        row.update({"ppl": round(ppl.ppl, 4), "eval_windows": ppl.windows})
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print("RESULT " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
