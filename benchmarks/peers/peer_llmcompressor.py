"""Run llmcompressor's GPTQModifier / AWQModifier on the embedded SmolLM2 and measure perplexity (peer side).

Runs with the python of its own venv (llmcompressor 0.14.0.1 pins transformers 5.17), called by bench_gptq_awq.py
as a subprocess with the interpreter given to its --peer-python. Calibration and evaluation token ids come from the
parent in a .pt file, so both tools see the same windows; perplexity uses lowbit's own function on the same windows.
The fake-quant weights are rebuilt explicitly from each layer's weight_scale / weight_zero_point (and g_idx), then
quantization is disabled, so what is evaluated is exactly the checkpoint's dequantized weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
from importlib import metadata

import torch


def build_recipe(method: str, bits: int, group_size: int, symmetric: bool, actorder: str | None, duo: bool):
    """llmcompressor 0.14 recipes; its AWQModifier only scales, a quantizing modifier follows (RTN or GPTQ)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    def scheme() -> dict:
        weights = QuantizationArgs(
            num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group_size, actorder=None
        )
        return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}

    def gptq() -> GPTQModifier:
        return GPTQModifier(config_groups=scheme(), ignore=["lm_head"], dampening_frac=0.01, actorder=actorder)

    if method == "gptq":
        return [gptq()]
    if method == "awq":
        return [AWQModifier(duo_scaling=duo), QuantizationModifier(config_groups=scheme(), ignore=["lm_head"])]
    if method == "awq+gptq":
        return [AWQModifier(duo_scaling=duo), gptq()]
    raise ValueError(method)


@torch.no_grad()
def dequantized_state(model: torch.nn.Module) -> int:
    """Replace every quantized Linear's weight by its fake-quant value and switch quantization off."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.lifecycle.helpers import disable_quantization

    count = 0
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None or not hasattr(module, "weight_scale"):
            continue
        g_idx = getattr(module, "weight_g_idx", None)
        kwargs = {"g_idx": g_idx} if g_idx is not None and "g_idx" in fake_quantize.__code__.co_varnames else {}
        w = fake_quantize(module.weight, module.weight_scale, module.weight_zero_point, scheme.weights, **kwargs)
        module.weight.copy_(w)
        count += 1
    model.apply(disable_quantization)
    return count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", required=True, choices=["gptq", "awq", "awq+gptq"])
    parser.add_argument("--bits", type=int, required=True)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--symmetric", action="store_true")
    parser.add_argument("--actorder", default="static", help="static | group | weight | none")
    parser.add_argument("--duo-scaling", action="store_true")
    parser.add_argument("--data", required=True, help=".pt with calibration ids [n, L] and eval ids [1, N]")
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--eval-windows", type=int, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    from lowbit.eval import perplexity
    from lowbit.models import load_model

    data = torch.load(args.data)
    path = load_model(None).path  # the cached fp32 HF directory lowbit converted once
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    calib = data["calibration"]
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    actorder = None if args.actorder == "none" else args.actorder
    recipe = build_recipe(args.method, args.bits, args.group_size, args.symmetric, actorder, args.duo_scaling)
    if not torch.cuda.is_available():
        # llmcompressor 0.14's AWQ pins its activation cache (pin_memory needs CUDA and raises on a CPU-only
        # machine); pinning only speeds host->GPU copies, so skipping it changes no number.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    started = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=calib.shape[0],
        max_seq_length=calib.shape[1],
        shuffle_calibration_samples=False,
    )
    seconds = time.perf_counter() - started
    quantized = dequantized_state(model)
    ppl = perplexity(model, data["eval"], seqlen=args.eval_seqlen, max_windows=args.eval_windows, progress=False)
    row = {
        "quantize_seconds": round(seconds, 3),
        "ppl": round(ppl.ppl, 4),
        "eval_windows": ppl.windows,
        "linears": quantized,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "versions": {name: metadata.version(name) for name in ("llmcompressor", "compressed-tensors", "transformers")},
    }
    with open(args.out, "w") as handle:
        json.dump(row, handle)


if __name__ == "__main__":
    main()
