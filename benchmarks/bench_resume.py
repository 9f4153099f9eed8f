"""Reliability on SmolLM2 (issue 14): kill -9 at a random block + --resume gives the byte-identical export,
what checkpointing costs, and how fast a doomed run is refused.

Every run is the real CLI in a subprocess (`python -m lowbit quantize ...`), one at a time:
1. SignRound W4G128 uninterrupted, checkpointing on (the default with --out);
2. the same with --no-checkpoint (overhead = wall-time difference, and `timings.checkpoint_seconds` measured
   inside the run);
3. the same run killed with SIGKILL at a random block (drawn from --seed), then re-run with --resume; the sha256
   of every export file (the run record aside: it holds timings) must match run 1's (and run 2's);
   (phase `overhead` repeats 1 and 2 alternately, since one pair of runs is at the mercy of other load)
4. fail-fast: compressed-tensors with group 128 on SmolLM2 (hidden size 576 = 4.5 x 128, so q/k/v/gate/up
   cannot be grouped by 128), timed from process start to the refusal.

    cd benchmarks && python bench_resume.py --out results/resume.json

Each run takes /tmp/lowbit-bench.lock (the machine's benchmark lock) for its own duration only.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from common import machine, write_json

RECORD = "lowbit_record.json"
LOCK = "/tmp/lowbit-bench.lock"


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.name != RECORD}


def command(out: Path, args: argparse.Namespace, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "lowbit", "quantize", "--recipe", "signround", "--scheme", "w4g128",
        "--dataset", "builtin", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
        "--opt", f"signround.iters={args.iters}", "--opt", "engine.progress=false", "--out", str(out), *extra,
    ]  # fmt: skip


@contextlib.contextmanager
def machine_lock() -> Iterator[None]:
    """Hold the shared benchmark lock for one run only: other jobs may use the CPU between runs, never during."""
    with open(LOCK, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    with machine_lock():
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        return time.perf_counter() - started, done


def run_ok(cmd: list[str]) -> float:
    seconds, done = timed(cmd)
    if done.returncode != 0:
        raise SystemExit(f"run failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds


def kill_at_block(cmd: list[str], out: Path, block: int) -> dict:
    """Start the run, SIGKILL it once block `block` is checkpointed (mid-way into the next block)."""
    work = out.parent / f".{out.name}.lowbit-work"
    marker = work / "g00" / f"block-{block:04d}.safetensors"
    with machine_lock():
        started = time.perf_counter()
        process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while not marker.exists():
            if process.poll() is not None:
                raise SystemExit(f"the run ended before block {block}: {process.stderr.read()[-2000:]}")
            time.sleep(0.02)
        time.sleep(1.0)  # inside block+1's tuning
        process.send_signal(signal.SIGKILL)
        process.wait()
    blocks = sorted(p.name for p in (work / "g00").iterdir() if p.name.startswith("block-"))
    return {
        "killed_after_block": block,
        "killed_at_s": round(time.perf_counter() - started, 2),
        "returncode": process.returncode,
        "blocks_on_disk": len(blocks),
        "leftover_partials": sorted(p.name for p in (work / "g00").iterdir() if p.name.endswith(".partial")),
        "output_exists_after_kill": out.exists(),
    }


def fail_fast(_args: argparse.Namespace, scratch: Path) -> dict:
    cmd = [
        sys.executable, "-m", "lowbit", "quantize", "--recipe", "gptq", "--scheme", "w4g128",
        "--format", "compressed-tensors", "--out", str(scratch / "refused"),
    ]  # fmt: skip
    seconds, done = timed(cmd)
    return {
        "command": " ".join(cmd[1:]),
        "seconds": round(seconds, 2),
        "returncode": done.returncode,
        "stderr_last_line": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "",
        "output_created": (scratch / "refused").exists(),
    }


def overhead(args: argparse.Namespace, scratch: Path) -> dict:
    """Checkpointed and --no-checkpoint runs, alternating, `--repeats` times each; the best of each compared."""
    runs = []
    for repeat in range(args.repeats):
        for checkpointed in (True, False):
            out = scratch / f"overhead-{repeat}-{int(checkpointed)}"
            seconds = run_ok(command(out, args, *(() if checkpointed else ("--no-checkpoint",))))
            timings = json.loads((out / RECORD).read_text())["timings"]
            runs.append({"checkpointed": checkpointed, "wall_s": round(seconds, 2), **timings})
            print("overhead run:", runs[-1], flush=True)
            shutil.rmtree(out)
    best = {flag: min(r["wall_s"] for r in runs if r["checkpointed"] is flag) for flag in (True, False)}
    inside = [100 * r["checkpoint_seconds"] / r["quantize_seconds"] for r in runs if r["checkpointed"]]
    return {
        "runs": runs,
        "best_checkpointed_s": best[True],
        "best_no_checkpoint_s": best[False],
        "wall_overhead_pct": round(100 * (best[True] / best[False] - 1), 2),
        "measured_overhead_pct": round(max(inside), 2),
    }


def kill_and_resume(args: argparse.Namespace, scratch: Path) -> dict:
    reference, plain, resumed = scratch / "reference", scratch / "plain", scratch / "resumed"
    seconds_ckpt = run_ok(command(reference, args))
    seconds_plain = run_ok(command(plain, args, "--no-checkpoint"))
    block = random.Random(args.seed).randrange(1, 28)
    kill = kill_at_block(command(resumed, args), resumed, block)
    print("kill:", kill, flush=True)
    seconds_resume = run_ok(command(resumed, args, "--resume"))
    return {
        "uninterrupted_checkpointed_s": round(seconds_ckpt, 2),
        "uninterrupted_no_checkpoint_s": round(seconds_plain, 2),
        "kill": kill,
        "resume_s": round(seconds_resume, 2),
        "sha256_resumed_equals_uninterrupted": digest(resumed) == digest(reference),
        "sha256_no_checkpoint_equals_checkpointed": digest(plain) == digest(reference),
        "export_sha256": digest(reference),
        "work_dir_removed": not (scratch / ".resumed.lowbit-work").exists(),
    }


PHASES = {"fail_fast": fail_fast, "kill_and_resume": kill_and_resume, "overhead": overhead}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/resume.json"))
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=14, help="draws the block to kill at")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per setting in the overhead phase")
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of " + ", ".join(PHASES))
    args = parser.parse_args()
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}  # phases run separately merge
    result.update({"machine": machine(), "settings": vars(args) | {"out": str(args.out)}})
    scratch = Path(tempfile.mkdtemp(prefix="lowbit-resume-"))
    try:
        for phase in args.phases.split(","):
            result[phase] = PHASES[phase](args, scratch)
            write_json(args.out, result)
            print(phase, json.dumps({k: v for k, v in result[phase].items() if k != "export_sha256"}), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
