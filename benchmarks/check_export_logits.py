"""Load a compressed-tensors export in transformers (bf16, dequantized by compressed-tensors) and in lowbit's packed
CPU runtime, each in its own process, and compare their logits on one prompt.

    python benchmarks/check_export_logits.py --export /tmp/lowbit-bench-stream/llama2-7b-rtn \
        --json benchmarks/results/stream_7b_logits.json
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402

PROMPT = "Quantization maps float weights to a few integer levels with a scale and a zero point."

TRANSFORMERS = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig
path, prompt, out, dtype = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                             quantization_config=CompressedTensorsConfig(dequantize=True))
ids = AutoTokenizer.from_pretrained(path)(prompt, return_tensors="pt").input_ids
last = model.config.num_hidden_layers - 1
names = [f"model.layers.0.self_attn.q_proj", f"model.layers.{last}.mlp.down_proj"]
weights = {name: model.get_submodule(name).weight.detach().clone() for name in names}
with torch.no_grad():
    torch.save({"ids": ids, "logits": model(input_ids=ids).logits.float(), "weights": weights}, out)
"""

LOWBIT = """
import sys, torch, lowbit
path, prompt, out = sys.argv[1:4]
loaded = lowbit.load(path, kernel="reference")  # dequantize per forward: the fake-quant model, bit for bit
ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids
last = loaded.model.config.num_hidden_layers - 1
names = [f"model.layers.0.self_attn.q_proj", f"model.layers.{last}.mlp.down_proj"]
weights = {name: loaded.model.get_submodule(name).dequantize() for name in names}
with torch.no_grad():
    torch.save({"ids": ids, "logits": loaded.model(input_ids=ids).logits.float(), "weights": weights}, out)
"""


def run(code: str, export: Path, out: Path, dtype: str = "bfloat16") -> dict:
    started = time.perf_counter()
    command = ["/usr/bin/time", "-v", sys.executable, "-c", code, str(export), PROMPT, str(out), dtype]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    peak = next(line for line in done.stderr.splitlines() if "Maximum resident set size" in line)
    return {"seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": round(int(peak.split()[-1]) / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--dtype", default="bfloat16", help="transformers' dtype (float32 needs 4 bytes a weight)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = {f"transformers_{args.dtype}": run(TRANSFORMERS, args.export, Path(tmp) / "hf.pt", args.dtype),
                "lowbit_packed": run(LOWBIT, args.export, Path(tmp) / "lowbit.pt")}  # fmt: skip
        hf, ours = torch.load(Path(tmp) / "hf.pt"), torch.load(Path(tmp) / "lowbit.pt")
    assert torch.equal(hf["ids"], ours["ids"]), "the two loaders tokenized the prompt differently"
    a, b = hf["logits"], ours["logits"]
    scale = b.abs().max().item()
    weights = {  # transformers' decompressed weight vs lowbit's dequantized fp32 weight in transformers' dtype
        name: bool(torch.equal(hf["weights"][name], ours["weights"][name].to(hf["weights"][name].dtype)))
        for name in hf["weights"]
    }
    comparison = {
        "weights_equal_in_transformers_dtype": weights,
        "tokens": int(a.shape[1]),
        "max_abs_diff": round((a - b).abs().max().item(), 5),
        "max_abs_logit": round(scale, 3),
        "relative_max_diff": round((a - b).abs().max().item() / scale, 5),
        "argmax_agreement": round((a.argmax(-1) == b.argmax(-1)).float().mean().item(), 4),
        "cosine": round(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item(), 6),
    }
    payload = {"benchmark": "export_logits", "command": " ".join(sys.argv), "machine": machine(),
               "export": str(args.export), "dtype": args.dtype, "prompt": PROMPT, "loaders": rows,
               "comparison": comparison}  # fmt: skip
    write_json(args.json, payload)
    print(payload["loaders"], comparison)


if __name__ == "__main__":
    main()
