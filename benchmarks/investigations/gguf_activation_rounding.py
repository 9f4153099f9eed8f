"""Is a gap between llama.cpp's and lowbit's perplexity of one GGUF export the writer, or llama.cpp's arithmetic?

llama.cpp's CPU dot products do not see float activations: before a quantized matmul it quantizes the input rows
to Q8_0 (blocks of 32, fp16 scale amax/127; Q8_1 for Q4_1/Q5_1, the same values) or Q8_K (blocks of 256, fp32 scale
from the signed extreme, for the K types), and its KV cache holds K and V in fp16. This script quantizes SmolLM2
with RTN at a `gguf:*` scheme, then evaluates lowbit's perplexity on the benchmark's windows twice: as lowbit
computes it, and with each quantized linear's input rounded the way llama.cpp's vec_dot for that weight type rounds
it (plus K/V projections' outputs rounded to fp16). If the second number lands on llama.cpp's, the file is what
lowbit evaluated and the gap is arithmetic.

    PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 10 python benchmarks/investigations/gguf_activation_rounding.py \
        --scheme q2_k_s
    # Gemma 3 270M (the PyPI GGUF parts, bench_families.py), imatrix RTN as in bench_gguf_llamacpp.py's Gemma rows
    ... gguf_activation_rounding.py --model gemma3 --recipe imatrix --scheme q4_k_m

The output matrix's input is rounded too, for its own type (a tied embedding's: Q8_0 on rows that are not a
multiple of 256).
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import Tensor, nn

Q8_K_TYPES = {"q2_k", "q3_k", "q4_k", "q5_k", "q6_k"}


def q8_0(x: Tensor) -> Tensor:
    """ggml's quantize_row_q8_0 (and q8_1's values): per 32, d = fp16(amax / 127), q = round(x / d)."""
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    d = amax / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round(blocks * inv)
    return (q * d.half().float()).reshape(x.shape)


def q8_k(x: Tensor) -> Tensor:
    """ggml's quantize_row_q8_K: per 256, iscale = -127 / (signed extreme), q = nearest(iscale x) <= 127,
    d = 1 / iscale (fp32)."""
    blocks = x.reshape(*x.shape[:-1], -1, 256)
    index = blocks.abs().argmax(-1, keepdim=True)
    extreme = blocks.gather(-1, index)
    iscale = torch.where(extreme != 0, -127 / extreme, torch.zeros_like(extreme))
    q = torch.round(blocks * iscale).clamp(max=127)
    d = torch.where(iscale != 0, 1 / iscale, torch.zeros_like(iscale))
    return (q * d).reshape(x.shape)


def install(model: nn.Module, types: dict[str, str], kv_fp16: bool) -> list:
    """Round each quantized linear's input as llama.cpp's dot product for its weight type does."""
    handles = []
    modules = dict(model.named_modules())
    for name, gguf_type in types.items():
        rounder = q8_k if gguf_type in Q8_K_TYPES else q8_0
        handles.append(modules[name].register_forward_pre_hook(lambda _m, args, r=rounder: (r(args[0]),)))
        if kv_fp16 and name.endswith(("k_proj", "v_proj")):
            handles.append(modules[name].register_forward_hook(lambda _m, _a, out: out.half().float()))
    return handles


def output_type(model: nn.Module, outside: dict) -> tuple[str, str] | None:
    """(module name, GGUF type) of the output matrix as the file stores it (a tied one: the embedding's type)."""
    head = model.get_output_embeddings()
    name = next(n for n, m in model.named_modules() if m is head)
    embed = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    record = outside.get(name, outside.get(embed))
    return None if record is None else (name, record.scheme.gguf)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheme", default="q2_k_s")
    parser.add_argument("--model", default="smollm2", help="smollm2 (embedded), gemma3 (PyPI parts) or an HF directory")
    parser.add_argument("--recipe", default="rtn")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=4)
    args = parser.parse_args()
    import lowbit
    from lowbit.data import load_eval
    from lowbit.eval.perplexity import perplexity
    from lowbit.models import load_model

    path = None if args.model == "smollm2" else args.model
    if args.model == "gemma3":
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from bench_families import model_dir

        path = str(model_dir(Path.home() / ".cache" / "lowbit" / "models"))
    loaded = load_model(path)
    data = load_eval(loaded.tokenizer, "builtin")
    options = {"engine": {"progress": False}}
    result = lowbit.quantize(loaded, recipe=args.recipe, scheme=f"gguf:{args.scheme}", options=options,
                             dataset="builtin", nsamples=args.nsamples, seqlen=args.seqlen, seed=42)  # fmt: skip
    types = {name: record.scheme.gguf for name, record in result.weights.items()}
    head = output_type(result.model, result.outside)
    if head is not None:
        types[head[0]] = head[1]
    rows = {}
    for label, kv in (("lowbit", None), ("activations as llama.cpp", False), ("activations + fp16 K/V", True)):
        handles = [] if kv is None else install(result.model, types, kv)
        ppl = perplexity(result.model, data.input_ids, seqlen=args.eval_seqlen, max_windows=args.eval_windows,
                         progress=False)  # fmt: skip
        for handle in handles:
            handle.remove()
        rows[label] = round(ppl.ppl, 4)
        print(json.dumps({"model": args.model, "recipe": args.recipe, "scheme": args.scheme, "evaluation": label,
                          "ppl": rows[label]}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
