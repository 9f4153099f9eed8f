"""GPU smoke run: every recipe on SmolLM2 on cuda and on cpu, a streamed run, timings side by side.

Usage (on a machine with a CUDA GPU; the command behind benchmarks/results/gpu_smoke.json):
    python benchmarks/gpu_smoke.py --out benchmarks/results/gpu_smoke.json
    python benchmarks/gpu_smoke.py --table benchmarks/results/gpu_smoke.json

Each row is one `lowbit quantize` in its own process (the embedded SmolLM2-135M, 32 x 512 calibration tokens, the
`builtin` perplexity on 4 windows of 512 tokens before and after) on one device; the JSON is rewritten after each
row and a rerun skips rows already in it. A row passes when the run exits 0 and, where both devices ran, the
perplexity after quantization on cuda is within `--tolerance` of the one on cpu (the same seed; the devices' float
sums differ, so tuned recipes drift a little). The last rows are a streamed run (`engine.stream=on`, weights read
block by block from the checkpoint) on each device. On a machine without CUDA, `--devices cpu` checks the script.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCHEME = "w4g128"
# recipe -> extra arguments: small settings so that every recipe finishes in minutes on the CPU side too
RECIPES: dict[str, list[str]] = {
    "rtn": [],
    "gptq": [],
    "awq+rtn": [],
    "awq+gptq": [],
    "signround": ["--opt", "signround.iters=50"],
    "teq+rtn": ["--opt", "teq.loss=mse", "--opt", "teq.steps=20"],
    "omniquant": ["--opt", "omniquant.epochs=1"],
    "desv": ["--opt", "desv.epochs=1"],
    "awq+invarexplore+rtn": ["--opt", "invarexplore.max_steps=20"],
}
STREAMED = {"gptq streamed": ("gptq", ["--opt", "engine.stream=on"])}
CALIBRATION = ["--nsamples", "32", "--seqlen", "512"]
EVALUATION = ["--eval", "--eval-dataset", "builtin", "--eval-seqlen", "512", "--eval-windows", "4"]


def run_row(recipe: str, extra: list[str], device: str, work: Path) -> dict:
    """One quantize run on `device`; returns its exit status, wall time and the run record's figures."""
    out = work / f"{recipe.replace('+', '_')}-{device}-{len(extra)}"
    command = [sys.executable, "-m", "lowbit", "quantize", "--recipe", recipe, "--scheme", SCHEME, *CALIBRATION]
    command += [*EVALUATION, "--format", "fake", "--no-checkpoint", "--out", str(out), "-q"]
    command += ["--opt", f"engine.device={device}", *extra]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    row = {"exit": done.returncode, "wall_seconds": round(time.perf_counter() - started, 2), "command": command}
    if done.returncode != 0:
        row["error"] = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return row
    record = json.loads((out / "lowbit_record.json").read_text())
    evaluation = record["evaluation"]
    row["ppl_before"] = evaluation["before"]["builtin"]["ppl"]
    row["ppl_after"] = evaluation["after"]["builtin"]["ppl"]
    row["quantize_seconds"] = record["timings"]["quantize_seconds"]
    row["peak_rss_mb"] = record["timings"]["peak_rss_mb"]
    return row


def machine() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "torch": torch.__version__, "gpu": gpu}


def judge(rows: dict, tolerance: float) -> dict[str, str]:
    """Per recipe: 'ok', 'failed on DEVICE', or the cuda/cpu perplexity ratio when it is beyond the tolerance."""
    verdicts = {}
    for name in sorted({key.rsplit("|", 1)[0] for key in rows}):
        on = {key.rsplit("|", 1)[1]: row for key, row in rows.items() if key.rsplit("|", 1)[0] == name}
        failed = [device for device, row in on.items() if row["exit"] != 0]
        if failed:
            verdicts[name] = "failed on " + ", ".join(failed)
        elif {"cuda", "cpu"} <= on.keys():
            ratio = on["cuda"]["ppl_after"] / on["cpu"]["ppl_after"]
            verdicts[name] = "ok" if abs(ratio - 1) <= tolerance else f"cuda/cpu perplexity {ratio:.4f}"
        else:
            verdicts[name] = "ok (one device)"
    return verdicts


def table(path: Path) -> str:
    data = json.loads(path.read_text())
    lines = [
        f"Machine: {data['machine']}",
        "",
        "| recipe | device | exit | ppl before | ppl after | quantize s | wall s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, row in data["rows"].items():
        name, device = key.rsplit("|", 1)
        figures = [row.get(k, "-") for k in ("ppl_before", "ppl_after", "quantize_seconds")]
        figures = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in figures]
        rest = [str(row.get(k, "-")) for k in ("wall_seconds", "peak_rss_mb")]
        lines.append(f"| {name} | {device} | {row['exit']} | " + " | ".join(figures + rest) + " |")
    lines += ["", "| recipe | verdict |", "|---|---|"]
    lines += [f"| {name} | {verdict} |" for name, verdict in data["verdicts"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="JSON file (rewritten after each row; a rerun continues)")
    parser.add_argument("--devices", default="cuda,cpu", help="comma-separated devices (default cuda,cpu)")
    parser.add_argument("--recipes", default=",".join([*RECIPES, *STREAMED]), help="comma-separated subset")
    parser.add_argument("--tolerance", type=float, default=0.02, help="cuda/cpu perplexity ratio allowed (2%%)")
    parser.add_argument("--table", type=Path, help="print the markdown table of a finished JSON file and stop")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    if args.out is None:
        parser.error("--out is required unless --table is given")
    data = json.loads(args.out.read_text()) if args.out.exists() else {"rows": {}}
    data.update(machine=machine(), command=" ".join(sys.argv), scheme=SCHEME)
    every = {**{name: (name, extra) for name, extra in RECIPES.items()}, **STREAMED}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.recipes.split(","):
            recipe, extra = every[name]
            for device in args.devices.split(","):
                key = f"{name}|{device}"
                if key in data["rows"]:
                    continue
                data["rows"][key] = run_row(recipe, extra, device, Path(tmp))
                print(key, {k: v for k, v in data["rows"][key].items() if k != "command"}, flush=True)
                data["verdicts"] = judge(data["rows"], args.tolerance)
                args.out.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
