"""Which tensors a GGUF export holds, in file order, with their GGUF names, types and byte sizes, and their data.

The plan needs only shapes and the records' schemes, so a writer can put every tensor info in the header before
any data (gguf-py's `add_tensor_info`, then `write_tensor_data` per tensor). Quantized linears are packed from
their records (blocks.py); everything else is written as the model holds it: 1-D tensors (norms) as F32, 2-D float
tensors (embeddings, an untied lm_head, linears a recipe left in float) at the model's dtype (F32, F16 or BF16),
so the file decodes to exactly the weights lowbit evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch
from torch import Tensor, nn

from lowbit.export.gguf.arch import GgufArch
from lowbit.export.gguf.blocks import pack_record
from lowbit.formats.gguf_types import GGUF_TYPES
from lowbit.quantizer import QuantizedWeight
from lowbit.scheme import QuantScheme

Q = gguf.GGMLQuantizationType
_FLOAT_TYPES = {torch.float32: Q.F32, torch.float16: Q.F16, torch.bfloat16: Q.BF16}


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the file: its GGUF name, the model's state-dict key, type, logical [out, in] shape."""

    name: str
    source: str
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    quantized: bool

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        count = int(np.prod(self.shape))
        return count // block * size


def float_type(t: Tensor) -> gguf.GGMLQuantizationType:
    """F32 for 1-D tensors (llama.cpp's norms), else the tensor's own float dtype."""
    return Q.F32 if t.dim() == 1 else _FLOAT_TYPES.get(t.dtype, Q.F32)


def _tied(model: nn.Module) -> bool:
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight


def plan_tensors(model: nn.Module, arch: GgufArch, schemes: dict[str, QuantScheme]) -> list[PlannedTensor]:
    """The file's tensors: `schemes` maps each quantized linear's module name to its (GGUF) scheme."""
    plan = []
    tied = _tied(model)
    for key, tensor in model.state_dict(keep_vars=True).items():
        module = key.rsplit(".", 1)[0]
        if tied and module == "lm_head":
            continue  # llama.cpp (and transformers) reuse token_embd when the file has no output.weight
        name = arch.tensor_name(key)
        shape = tuple(int(d) for d in tensor.shape)
        if module in schemes and key.endswith(".weight"):
            qtype = Q(GGUF_TYPES[schemes[module].gguf].ggml_type)  # type: ignore[index]
            plan.append(PlannedTensor(name, key, qtype, shape, True))
        else:
            plan.append(PlannedTensor(name, key, float_type(tensor), shape, False))
    return plan


def tensor_bytes(
    item: PlannedTensor, state: dict[str, Tensor], records: dict[str, QuantizedWeight], arch: GgufArch
) -> np.ndarray:
    """The tensor's data as the file stores it (Q/K rows in llama.cpp's order); `state` is the model's state dict."""
    if item.quantized:
        data = pack_record(records[item.source.rsplit(".", 1)[0]])
    else:
        t = arch.stored_float(item.source, state[item.source].detach().cpu())
        if item.qtype == Q.BF16:
            data = t.contiguous().view(torch.int16).numpy().view(np.uint8).reshape(t.shape[0], -1)
        else:
            data = t.to(torch.float32 if item.qtype == Q.F32 else torch.float16).numpy()
    return np.ascontiguousarray(arch.permute_rows(item.name, data))
