"""Streamed quantization of a checkpoint larger than you would load whole: peak RSS and wall time per run, next to
a plain read of the shards, each in a fresh process with a cold page cache (root: drops the caches first).

    flock /tmp/lowbit-bench.lock python benchmarks/bench_stream.py --model /work/big/llama2-7b \
        --runs read,rtn --json benchmarks/results/stream_7b.json

Runs: `cat` (the shards to /dev/null: the disk's floor), `read` (every block through lowbit's reader at fp32, as
the streamed loop reads it), `rtn` / `gptq` / `awq+rtn` / ... (`lowbit quantize --opt engine.stream=on`, W4G128,
compressed-tensors, `--nsamples x --seqlen` of builtin calibration text). Peak RSS is the child's VmHWM
(`/usr/bin/time -v`'s maximum resident set size).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402

READ = """
import sys, time, torch
from pathlib import Path
from lowbit.engine.skeleton import StreamedModel
from lowbit.engine.streaming import return_freed_memory
model = StreamedModel(Path(sys.argv[1]))
for i in range(model.num_blocks):
    model.materialize_block(i); model.release_block(i); return_freed_memory()
"""


def drop_caches() -> bool:
    """Empty the page cache so every run reads the checkpoint from disk (needs root; False when not allowed)."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(command: list[str], log: Path) -> dict:
    """Run `command` under /usr/bin/time -v; wall seconds, peak RSS (MB) and the exit status."""
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    wall = time.perf_counter() - started
    log.write_text(done.stdout + "\n" + done.stderr)
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    peak = int(match.group(1)) / 1024 if match else None
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
    return {"seconds": round(wall, 1), "peak_rss_mb": round(peak, 1) if peak else None, "exit": done.returncode}


def digests(directory: Path) -> dict[str, str]:
    """sha256 of each export file but the run record (timings) and the model card (it names its folder)."""
    skip = ("lowbit_record.json", "README.md")
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.name not in skip
    }


def command_for(run: str, args: argparse.Namespace, out: Path) -> list[str]:
    shards = sorted(str(p) for p in args.model.glob("*.safetensors"))
    if run == "cat":
        return ["sh", "-c", f"cat {' '.join(shards)} > /dev/null"]
    if run == "read":
        return [sys.executable, "-c", READ, str(args.model)]
    return [sys.executable, "-m", "lowbit", "quantize", str(args.model), "--recipe", run, "--scheme", args.scheme,
            "--dataset", "builtin", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
            "--format", args.format, "--out", str(out), "--overwrite", "--no-checkpoint", "--quiet",
            "--opt", f"engine.stream={args.stream}", *(f"--opt={opt}" for opt in args.opt)]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--runs", default="cat,read,rtn")
    parser.add_argument("--scheme", default="w4g128")
    parser.add_argument("--format", default="compressed-tensors")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--stream", default="on")
    parser.add_argument(
        "--compare-resident", action="store_true", help="also run each recipe resident: time ratio and export bytes"
    )
    parser.add_argument("--opt", action="append", default=[], help="more --opt STAGE.NAME=VALUE for lowbit")
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/lowbit-bench-stream"))
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    size = sum(p.stat().st_size for p in args.model.glob("*.safetensors"))
    rows = []
    for run in args.runs.split(","):
        cold = drop_caches()
        out = args.out_dir / f"{args.model.name}-{run.replace('+', '-')}"
        row = {"run": run, "cold_cache": cold, **timed(command_for(run, args, out), args.out_dir / f"{run}.log")}
        if out.is_dir():
            row["export_bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        if args.compare_resident and run not in ("cat", "read"):
            drop_caches()
            resident = argparse.Namespace(**{**vars(args), "stream": "off"})
            twin = out.with_name(out.name + "-resident")
            row["resident"] = timed(command_for(run, resident, twin), args.out_dir / f"{run}-resident.log")
            row["stream_over_resident_time"] = round(row["seconds"] / row["resident"]["seconds"], 3)
            row["same_export_bytes"] = digests(out) == digests(twin)
        rows.append(row)
        print(row, flush=True)
    floor = next((row["seconds"] for row in rows if row["run"] == "cat"), None)
    for row in rows:
        if floor:
            row["ratio_to_cat"] = round(row["seconds"] / floor, 2)
    payload = {
        "benchmark": "stream",
        "command": " ".join(sys.argv),
        "machine": machine(),
        "model": {"path": str(args.model), "checkpoint_bytes": size},
        "settings": {key: getattr(args, key) for key in ("scheme", "format", "nsamples", "seqlen", "stream", "opt")},
        "rows": rows,
    }
    write_json(args.json, payload)
    print("| run | wall s | peak RSS MB | x cat |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['run']} | {row['seconds']} | {row['peak_rss_mb']} | {row.get('ratio_to_cat', '')} |")


if __name__ == "__main__":
    main()
