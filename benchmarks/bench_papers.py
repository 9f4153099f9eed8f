"""Each paper's main directional claim on text the method never saw, over several seeds (issue 31).

Usage (the commands behind benchmarks/results/papers.md; MODEL is smollm2 or gemma3):
    flock /tmp/lowbit-bench.lock python benchmarks/bench_papers.py --model MODEL \
        --out benchmarks/results/papers_MODEL.json

Calibration is the `builtin` training split (CPython's documentation topics); perplexity is measured on the
`builtin` evaluation split (same domain, documents never calibrated on) and on the `licenses` evaluation split
(legal prose: another domain). Every row runs in its own process; the JSON is rewritten after each row and a rerun
skips rows already in it, so the grid can be stopped and continued. `python benchmarks/bench_papers.py --table
FILE...` prints the mean and spread per configuration from finished JSON files.

Groups (one per paper's claim):
- signround: SignRound vs RTN, GPTQ, AWQ+RTN at W2/W3/W4 G128;
- teq: TEQ+RTN and TEQ+GPTQ vs RTN and GPTQ (the rows of `signround` are the controls);
- invarexplore: AWQ+InvarExplore+RTN vs AWQ+RTN (a fixed step budget, so contention cannot change the result);
- omniquant: DESV and LSI vs OmniQuant trained as many epochs in total (the fair control) and OmniQuant itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, run_isolated, write_json  # noqa: E402

MODELS = {
    "smollm2": None,  # the embedded default
    "gemma3": str(Path.home() / ".cache/lowbit/models/gemma-3-270m-f32"),
}
DOMAINS = ("builtin", "licenses")  # in-domain (held-out documents), cross-domain
EVAL_WINDOWS = 6  # windows of 2048 tokens per domain: 12,288 tokens of builtin, all 5 windows of licenses
SIGNROUND = {"signround": {"iters": 50, "batch_size": 8}}  # signround-cpu's tuning at the common calibration
TEQ = {"teq": {"steps": 100, "eval_samples": 8}}
OMNI_CPU = {"epochs": 2, "lwc_init": "mse", "lwc_lr": 5e-2}  # omniquant-cpu / desv-cpu


@dataclass(frozen=True)
class Config:
    """One row of the grid minus its seed: a name for the table, the recipe, scheme, options and calibration."""

    group: str
    label: str
    recipe: str
    scheme: str
    options: dict = field(default_factory=dict)
    nsamples: int = 32
    seqlen: int = 512
    seeded: bool = True  # False: data-free (RTN), one run stands for every seed

    def key(self, seed: int) -> str:
        return f"{self.group}|{self.label}|{self.scheme}|{seed if self.seeded else '-'}"


def grid(groups: list[str], invar_steps: int) -> list[Config]:
    """The configurations of `groups`, in run order."""
    configs: list[Config] = []
    if "signround" in groups:
        for scheme in ("w2g128", "w3g128", "w4g128"):
            configs += [
                Config("signround", "RTN", "rtn", scheme, seeded=False),
                Config("signround", "GPTQ", "gptq", scheme),
                Config("signround", "AWQ+RTN", "awq+rtn", scheme),
                Config("signround", "SignRound", "signround", scheme, SIGNROUND),
            ]
    if "teq" in groups:
        for scheme in ("w3g128", "w4g128"):
            configs += [
                Config("teq", "TEQ+RTN", "teq+rtn", scheme, TEQ),
                Config("teq", "TEQ+GPTQ", "teq+gptq", scheme, TEQ),
            ]
    if "invarexplore" in groups:
        invar = {"invarexplore": {"max_steps": invar_steps, "samples": 16, "progress": False, "log_every": 10}}
        for scheme in ("w2g128", "w3g128"):  # its control is the signround group's AWQ+RTN (same calibration)
            configs.append(Config("invarexplore", "AWQ+InvarExplore+RTN", "awq+invarexplore+rtn", scheme, invar))
    if "omniquant" in groups:
        for scheme, extra in (("w2g128", {}), ("w4a4", {"let": True})):
            base = {**OMNI_CPU, **extra}
            configs += [
                Config("omniquant", "OmniQuant (2 epochs)", "omniquant", scheme, {"omniquant": base}, 16, 256),
                Config(
                    "omniquant",
                    "OmniQuant (4 epochs, fair control)",
                    "omniquant",
                    scheme,
                    {"omniquant": {**base, "epochs": 4}},
                    16,
                    256,
                ),
                Config("omniquant", "LSI (2+2 epochs)", "desv", scheme, {"desv": {**base, "n": 0}}, 16, 256),
                Config("omniquant", "DESV (2+2 epochs)", "desv", scheme, {"desv": base}, 16, 256),
            ]
    return configs


def run_row(model: str | None, config: dict, seed: int, threads: int) -> dict:
    """Quantize (or not, for the float row) and measure perplexity on both domains; in its own process."""
    import lowbit
    from lowbit.data import load_eval
    from lowbit.eval import perplexity
    from lowbit.models import load_model

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    loaded = load_model(model)
    started = time.perf_counter()
    if config["recipe"] == "float":
        quantized, seconds = None, 0.0
    else:
        quantized = lowbit.quantize(
            loaded,
            recipe=config["recipe"],
            scheme=config["scheme"],
            dataset="builtin",
            nsamples=config["nsamples"],
            seqlen=config["seqlen"],
            seed=seed,
            options={"engine": {"progress": False}, **config["options"]},
        )
        seconds = time.perf_counter() - started
    row: dict = {"quantize_seconds": round(seconds, 2)}
    for domain in DOMAINS:
        if quantized is None:
            ids = load_eval(loaded.tokenizer, domain).input_ids
            result = perplexity(loaded.model, ids, max_windows=EVAL_WINDOWS, progress=False)
        else:
            result = quantized.perplexity(domain, max_windows=EVAL_WINDOWS)
        row[f"ppl_{domain}"] = round(result.ppl, 4)
        row[f"windows_{domain}"] = result.windows
    if quantized is not None:
        row["stage_metrics"] = _summary(quantized.record)
    return row


def _summary(record: dict) -> dict:
    """The few per-stage numbers worth keeping next to a row (InvarExplore's steps and acceptances)."""
    invar = record.get("stages", {}).get("invarexplore")
    if not isinstance(invar, dict):
        return {}
    keep = ("steps", "accepts", "ce0", "initial_objective", "final_objective", "final_ce", "seconds", "log")
    return {"invarexplore": {k: invar[k] for k in keep if k in invar}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--groups", default="signround,invarexplore,teq,omniquant")
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--invar-steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--table", type=Path, nargs="+", help="print the summary table of these JSON files")
    args = parser.parse_args()
    if args.table:
        print(table([row for path in args.table for row in json.loads(path.read_text())["rows"]]))
        return
    if args.out is None:
        parser.error("--out is required")
    seeds = [int(s) for s in args.seeds.split(",")]
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    rows: list[dict] = previous.get("rows", [])
    done = {row["key"] for row in rows}
    payload = {
        "benchmark": "papers",
        "model": args.model,
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "settings": vars(args) | {"out": str(args.out), "table": None, "domains": list(DOMAINS)},
        "rows": rows,
    }
    todo: list[tuple[Config, int]] = [(Config("float", "float", "float", "-", seeded=False), seeds[0])]
    for group in args.groups.split(","):  # one claim at all seeds before the next: a stopped grid has whole claims
        for seed in seeds:
            todo += [(config, seed) for config in grid([group], args.invar_steps)]
    for config, seed in todo:
        key = config.key(seed)
        if key in done:
            continue
        done.add(key)
        measured = run_isolated(run_row, MODELS[args.model], asdict(config), seed, args.threads)
        row = {"key": key, **asdict(config), "seed": seed if config.seeded else None, **measured}
        print(json.dumps({k: v for k, v in row.items() if k != "options"}), flush=True)
        rows.append(row)
        write_json(args.out, payload)
    print(table(rows))


def table(rows: list[dict]) -> str:
    """Mean and spread (min-max over seeds) per configuration and domain, markdown."""
    grouped: dict[tuple, list[dict]] = {}
    for row in rows:
        grouped.setdefault((row["group"], row["scheme"], row["label"]), []).append(row)
    lines = [
        "| group | scheme | method | seeds | in-domain ppl (builtin) | cross-domain ppl (licenses) | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (group, scheme, label), members in grouped.items():
        cells = [_spread([m[f"ppl_{d}"] for m in members]) for d in DOMAINS]
        seconds = statistics.mean(m["quantize_seconds"] for m in members)
        seeds = ",".join(str(m["seed"]) for m in members) if members[0]["seed"] is not None else "data-free"
        lines.append(f"| {group} | {scheme} | {label} | {seeds} | {cells[0]} | {cells[1]} | {seconds:.0f} |")
    return "\n".join(lines)


def _spread(values: list[float]) -> str:
    """'mean (min-max)' for several seeds, the value alone for one."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


if __name__ == "__main__":
    main()
