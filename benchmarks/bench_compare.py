"""One `lowbit compare` table for SmolLM2 (issue 17): float, RTN, GPTQ, AWQ+RTN, SignRound, TEQ+GPTQ at W4G64 and
W3G64 (g64: the largest group compressed-tensors can hold on SmolLM2's 576-wide layers), perplexity and the two
offline tasks that ship with lowbit (`lowbit_mc`, `lowbit_cloze`; 5-shot).

Every export is written by the CLI (`--format auto`, i.e. compressed-tensors), then one `lowbit compare` call
evaluates all of them and the float model on the same windows and items (packed exports on lowbit's CPU runtime):

    cd benchmarks && python bench_compare.py --out results/compare.json

Each CLI call takes /tmp/lowbit-bench.lock for its own duration.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, write_json

LOCK = "/tmp/lowbit-bench.lock"
RECIPES = {
    "rtn": [],
    "gptq": [],
    "awq+rtn": [],
    "signround": ["--opt", "signround.iters=20"],
    "teq+gptq": ["--opt", "teq.steps=30"],
}


def run(cmd: list[str]) -> float:
    with open(LOCK, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
    print(done.stdout[-2000:], flush=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/compare.json"))
    parser.add_argument(
        "--schemes", default="w4g64:all,w3g64:all", help="scheme:recipes pairs, recipes '+'-free names joined by '/'"
    )
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--limit", type=int, default=200, help="items per task (each task has 200)")
    parser.add_argument("--num-fewshot", type=int, default=5)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="lowbit-compare-"))
    lowbit = [sys.executable, "-m", "lowbit"]
    try:
        outputs = []
        for pair in args.schemes.split(","):
            scheme, wanted = pair.split(":")
            for recipe, extra in RECIPES.items():
                if wanted != "all" and recipe not in wanted.split("/"):
                    continue
                out = scratch / f"{recipe}-{scheme}"
                run([*lowbit, "quantize", "--recipe", recipe, "--scheme", scheme, "--dataset", "builtin",
                     "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--quiet", *extra,
                     "--out", str(out)])  # fmt: skip
                outputs.append(str(out))
        table = scratch / "table.json"
        compare = [*lowbit, "compare", *outputs, "--float", "--ppl", "builtin", "--eval-windows",
                   str(args.eval_windows), "--tasks", "lowbit_offline", "--limit", str(args.limit), "--num-fewshot",
                   str(args.num_fewshot), "--markdown",
                   "--json", str(table), "--quiet"]  # fmt: skip
        seconds = run(compare)
        rows = json.loads(table.read_text())
        settings = vars(args) | {"out": str(args.out)}
        write_json(args.out, {"machine": machine(), "settings": settings, "compare_seconds": round(seconds, 1),
                              "command": " ".join(compare[1:]), "rows": rows})  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
