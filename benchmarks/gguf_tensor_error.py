"""Where two GGUF files of the embedded SmolLM2 differ: each block linear's importance-weighted error (issue 32).

For every block linear, the file's tensor (decoded by gguf-py, the Q/K row permutation undone) is compared with the
float weight it was made from: error = sum_ij e_j (w_ij - q_ij)^2 / sum_ij e_j w_ij^2, where e_j is the mean square
of column j's inputs over lowbit's 16 x 512 calibration windows (seed 42, llama.cpp's "importance matrix"). The table
groups the errors by GGUF type, so a gap between two files shows up where it comes from. It also reports how many of
each float linear's 32-value blocks hold at most 16 distinct values: the embedded SmolLM2 is a dequantized Q4_1 file,
so a grid that can hold Q4_1's (`w = d*q + m` per block of 32) can reproduce its weights.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/gguf_tensor_error.py \
        --out benchmarks/results/gguf_tensor_error.json LABEL=FILE.gguf [LABEL=FILE.gguf ...]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402


def column_energy(model: torch.nn.Module, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean square input per column of every block linear, over the calibration windows."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = defaultdict(int)
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":

            def hook(_module, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + (x * x).sum(0)
                counts[name] += x.shape[0]

            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for row in windows:
            model(row[None])
    for handle in handles:
        handle.remove()
    return {name: (sums[name] / counts[name]).float() for name in sums}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="LABEL=path/to/model.gguf")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import gguf

    from lowbit.data import load_calibration
    from lowbit.export.gguf.arch import gguf_arch
    from lowbit.models import load_model

    loaded = load_model(None)
    model = loaded.model.float().eval()
    calib = load_calibration(loaded.tokenizer, "builtin", nsamples=16, seqlen=512, seed=42)
    energy = column_energy(model, calib.input_ids)
    names = gguf_arch(model)
    params = dict(model.named_parameters())
    labels = [item.split("=", 1)[0] for item in args.files]
    readers = [{t.name: t for t in gguf.GGUFReader(item.split("=", 1)[1]).tensors} for item in args.files]
    per_type: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    on_q4_1_grid = []
    for module, e in energy.items():
        w = params[f"{module}.weight"].detach().float()
        blocks = w.reshape(-1, 32)
        on_q4_1_grid.append(float(np.mean([len(torch.unique(b)) <= 16 for b in blocks[:: max(1, len(blocks) // 512)]])))
        tensor_name = names.tensor_name(f"{module}.weight")
        denominator = float(((w * w) * e).sum())
        for label, reader in zip(labels, readers, strict=True):
            t = reader[tensor_name]
            decoded = names.unpermute_rows(tensor_name, gguf.quants.dequantize(t.data, t.tensor_type))
            q = torch.from_numpy(np.ascontiguousarray(decoded, dtype=np.float32)).reshape(w.shape)
            per_type[t.tensor_type.name][label].append(float((((q - w) ** 2) * e).sum()) / denominator)
    rows = [
        {"type": name, "tensors": len(next(iter(by_label.values()))),
         **{label: float(np.mean(values)) for label, values in by_label.items()}}
        for name, by_label in sorted(per_type.items())
    ]  # fmt: skip
    total = {label: float(sum(sum(by[label]) for by in per_type.values())) for label in labels}
    payload = {"machine": machine(), "files": dict(item.split("=", 1) for item in args.files), "rows": rows,
               "sum_over_tensors": total, "blocks_with_at_most_16_values": float(np.mean(on_q4_1_grid))}  # fmt: skip
    write_json(args.out, payload)
    print("| type | tensors | " + " | ".join(labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for row in rows:
        print(f"| {row['type']} | {row['tensors']} | " + " | ".join(f"{row[label]:.3g}" for label in labels) + " |")
    print("| all (sum) | | " + " | ".join(f"{total[label]:.3g}" for label in labels) + " |")
    print(f"float blocks of 32 with at most 16 distinct values: {payload['blocks_with_at_most_16_values']:.1%}")


if __name__ == "__main__":
    main()
