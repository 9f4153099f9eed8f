"""Read a written GGUF file back with gguf-py and check every tensor: the quantized ones decode (gguf-py's own
`dequantize`) to exactly `QuantizedWeight.dequantize()`, the float ones equal the model's, names and types are
the plan's. A mismatch is a bug in lowbit, so it raises instead of warning (auto-round checks 64 rows to 10 %)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import gguf
import numpy as np

from lowbit.export.gguf.tensors import expected_values

if TYPE_CHECKING:
    from pathlib import Path

    from lowbit.export.gguf.writer import PreparedGguf


def verify_file(path: Path, prepared: PreparedGguf) -> None:
    """Raise RuntimeError naming the first tensor of `path` that is not what lowbit evaluated."""
    reader = gguf.GGUFReader(path)
    found = {t.name: t for t in reader.tensors}
    planned = {t.name: t for t in prepared.tensors}
    if list(found) != list(planned):
        raise RuntimeError(f"GGUF file {path} holds tensors {list(found)[:4]}..., the plan {list(planned)[:4]}...")
    state = prepared.model.state_dict()
    for name, item in planned.items():
        tensor = found[name]
        if tensor.tensor_type != item.qtype:
            raise RuntimeError(f"{name}: written as {tensor.tensor_type.name}, planned {item.qtype.name}")
        decoded = prepared.arch.unpermute_rows(name, gguf.quants.dequantize(tensor.data, tensor.tensor_type))
        expected = expected_values(item, state, prepared.records, prepared.arch)
        if not np.array_equal(decoded.reshape(expected.shape), expected):
            diff = float(np.abs(decoded.reshape(expected.shape) - expected).max())
            raise RuntimeError(f"{name} in {path} decodes to other weights than lowbit's (max |diff| {diff:g})")
