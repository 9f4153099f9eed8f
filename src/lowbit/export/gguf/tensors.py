"""Which tensors a GGUF export holds, in file order, with their GGUF names, types and byte sizes, and their data.

The plan needs only shapes and the records' schemes, so a writer can put every tensor info in the header before
any data (gguf-py's `add_tensor_info`, then `write_tensor_data` per tensor). Quantized linears, and the embedding and
output a GGUF scheme rounded (embeddings.py), are packed from their records (blocks.py); everything else is written as
the model holds it: 1-D tensors (norms) as F32, 2-D float tensors (linears a recipe left in float, an embedding no
block type holds) at the model's dtype (F32, F16 or BF16),
so the file decodes to exactly the weights lowbit evaluated. A sparse block's experts, which lowbit quantizes as
per-expert linears, are one stacked 3-D tensor per kind (`ffn_gate_exps` [E, I, H]): each expert's packed rows in
expert order, all of one type.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import gguf
import numpy as np
import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.export.gguf.arch import GgufArch, expert_index
from lowbit.export.gguf.blocks import pack_record
from lowbit.formats.gguf_types import GGUF_TYPES
from lowbit.quantizer import QuantizedWeight
from lowbit.scheme import QuantScheme

Q = gguf.GGMLQuantizationType
_FLOAT_TYPES = {torch.float32: Q.F32, torch.float16: Q.F16, torch.bfloat16: Q.BF16}


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the file: its GGUF name, the model's state-dict key, type, logical [out, in] shape; `parts`
    are the state-dict keys of stacked experts (`source` is the first), empty for an ordinary tensor."""

    name: str
    source: str
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    quantized: bool
    parts: tuple[str, ...] = ()

    @property
    def sources(self) -> tuple[str, ...]:
        return self.parts or (self.source,)

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
    plan: list[PlannedTensor] = []
    stacked: dict[str, int] = {}  # GGUF name of stacked experts -> its index in plan
    tied = _tied(model)
    for key, tensor in model.state_dict(keep_vars=True).items():
        module = key.rsplit(".", 1)[0]
        if tied and module == "lm_head":
            continue  # llama.cpp (and transformers) reuse token_embd when the file has no output.weight
        name = arch.tensor_name(key)
        shape = tuple(int(d) for d in tensor.shape)
        quantized = module in schemes and key.endswith(".weight")
        gguf_type = schemes[module].gguf if quantized else None
        qtype = Q(GGUF_TYPES[gguf_type].ggml_type) if gguf_type else float_type(tensor)
        if expert_index(key) is None:
            plan.append(PlannedTensor(name, key, qtype, shape, quantized))
            continue
        if name not in stacked:
            stacked[name] = len(plan)
            plan.append(PlannedTensor(name, key, qtype, (0, *shape), quantized, ()))
        first = plan[stacked[name]]
        if (first.qtype, first.shape[1:], first.quantized) != (qtype, shape, quantized):
            raise LowbitError(
                f"{key} is {qtype.name} {shape}, the other experts of {name} {first.qtype.name} {first.shape[1:]}: "
                "GGUF stores a block's experts as one tensor of one type"
            )
        plan[stacked[name]] = replace(first, shape=(first.shape[0] + 1, *shape), parts=(*first.parts, key))
    return plan


def _one(key: str, item: PlannedTensor, state: dict[str, Tensor], records: dict[str, QuantizedWeight],
         arch: GgufArch) -> np.ndarray:  # fmt: skip
    if item.quantized:
        return pack_record(records[key.rsplit(".", 1)[0]])
    t = arch.stored_float(key, state[key].detach().cpu())
    if item.qtype == Q.BF16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint8).reshape(t.shape[0], -1)
    return t.to(torch.float32 if item.qtype == Q.F32 else torch.float16).numpy()


def tensor_bytes(
    item: PlannedTensor, state: dict[str, Tensor], records: dict[str, QuantizedWeight], arch: GgufArch
) -> np.ndarray:
    """The tensor's data as the file stores it (Q/K rows in llama.cpp's order); `state` is the model's state dict."""
    if item.parts:
        return np.ascontiguousarray(np.stack([_one(key, item, state, records, arch) for key in item.parts]))
    return np.ascontiguousarray(arch.permute_rows(item.name, _one(item.source, item, state, records, arch)))


def expected_values(
    item: PlannedTensor, state: dict[str, Tensor], records: dict[str, QuantizedWeight], arch: GgufArch
) -> np.ndarray:
    """What the tensor must decode to, in transformers' row order: the records' weights (quantized) or the model's
    tensor as stored (float), experts stacked."""
    values = []
    for key in item.sources:
        if item.quantized:
            values.append(records[key.rsplit(".", 1)[0]].dequantize().numpy())
        else:
            values.append(arch.stored_float(key, state[key].detach().cpu()).float().numpy())
    return np.stack(values) if item.parts else values[0]
