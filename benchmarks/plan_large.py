"""The memory planner's plans (no run) for Llama-2-7B, Llama-3.1-70B and Llama-3.1-405B shapes.

GPTQ and SignRound W4G128 at 128 x 2048 on one 80 GB GPU with 64 GB of RAM (available=64e9, gpu_available=80e9,
stream=auto), and Llama-2-7B at 32 x 512 on this machine's RAM (CPU). Prints each plan's table and writes
benchmarks/results/plan_large.json. Runs in seconds: only config dicts, nothing is loaded.

    PYTHONPATH=src python benchmarks/plan_large.py
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lowbit.config import build_config
from lowbit.planner.plan import available_memory, plan_run

LLAMA_2_7B = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False,
    "torch_dtype": "float16",
}  # fmt: skip
LLAMA_31_70B = {
    "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}  # fmt: skip
LLAMA_31_405B = {
    "model_type": "llama", "hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126,
    "num_attention_heads": 128, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}  # fmt: skip
MODELS = {"Llama-2-7B": LLAMA_2_7B, "Llama-3.1-70B": LLAMA_31_70B, "Llama-3.1-405B": LLAMA_31_405B}
GPU_HOST = {"available": int(64e9), "gpu_available": int(80e9)}


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    cases = [(model, recipe, 128, 2048, "cuda", GPU_HOST) for model in MODELS for recipe in ("gptq", "signround")]
    here = {"available": available_memory(), "gpu_available": None}
    cases += [("Llama-2-7B", recipe, 32, 512, "cpu", here) for recipe in ("gptq", "signround")]
    rows = []
    for model, recipe, nsamples, seqlen, device, memory in cases:
        config = build_config(recipe=recipe, scheme="w4g128", nsamples=nsamples, seqlen=seqlen,
                              options={"engine": {"device": device}})  # fmt: skip
        plan = plan_run(MODELS[model], config, stream_option="auto", **memory)
        title = f"{model} {recipe} w4g128 {nsamples} x {seqlen} on {device}"
        print(f"=== {title}\n{plan.describe()}\n")
        rows.append({"case": title, "model": model, "refusal": None if plan.fits else plan.refusal(),
                     **plan.to_dict()})  # fmt: skip
    out = Path(__file__).parent / "results" / "plan_large.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
