"""The token embedding and the output matrix of a GGUF scheme, typed and rounded as llama.cpp's quantizer does.

llama.cpp (`llama_tensor_get_type_impl`) stores `output.weight`, and `token_embd.weight` when the model ties the two,
as Q6_K, or Q8_0 when the scheme's type is Q8_0 or the row is not a multiple of that type's block; an untied
`token_embd` gets the scheme's type. The shape fallback follows (a Q6_K row that is not a multiple of 256 is Q8_0;
a row no block holds stays float). lowbit rounds these matrices on the same grids with RTN at the start of the run,
in place, so that calibration, evaluation and the file all see the weights the file decodes to.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lowbit.export.gguf.mixes import shape_fallback, type_scheme
from lowbit.formats.gguf_types import GGUF_TYPES, base_type
from lowbit.quantizer import QuantizedWeight, quantize_weight
from lowbit.scheme import QuantScheme

log = logging.getLogger(__name__)

ROWS_PER_CHUNK = 16384  # rows rounded at a time: a 128k-token embedding never needs several float copies at once


def output_type(default: str, row: int) -> str | None:
    """The type of the output matrix (or of a tied embedding) under a scheme whose type is `default`."""
    wanted = "q8_0" if row % GGUF_TYPES[default].block or default == "q8_0" else "q6_k"
    return shape_fallback(wanted, row)


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


def outside_types(model: nn.Module, scheme: QuantScheme) -> dict[str, str]:
    """Module name -> GGUF type for the input embedding and an untied output layer; {} for a non-GGUF scheme."""
    gguf_type = base_type(scheme.gguf) if scheme.gguf is not None else None
    if gguf_type is None:
        return {}
    embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    tied = output is not None and output.weight is embedding.weight
    row = int(embedding.weight.shape[1])
    types = {_module_name(model, embedding): output_type(gguf_type.name, row) if tied else shape_fallback(
        gguf_type.name, row)}  # fmt: skip
    if output is not None and not tied:
        types[_module_name(model, output)] = output_type(gguf_type.name, int(output.weight.shape[1]))
    return {name: t for name, t in types.items() if t is not None}


def round_rows(weight: torch.Tensor, scheme: QuantScheme) -> QuantizedWeight:
    """RTN of a matrix on `scheme`'s grid, a chunk of rows at a time (the groups lie along the rows)."""
    parts = [quantize_weight(weight[i : i + ROWS_PER_CHUNK].float(), scheme)
             for i in range(0, weight.shape[0], ROWS_PER_CHUNK)]  # fmt: skip
    if len(parts) == 1:
        return parts[0]
    return QuantizedWeight(*(torch.cat([getattr(p, key) for p in parts]) for key in ("codes", "scale", "zero")),
                           scheme=scheme)  # fmt: skip


@torch.no_grad()
def round_outside(model: nn.Module, scheme: QuantScheme) -> dict[str, QuantizedWeight]:
    """Round the embedding (and an untied output) in place on their GGUF grids; their records by module name.

    The weights become float32 (the dequantized values are exact there); a tied output follows the embedding."""
    records = {}
    for name, gguf_type in outside_types(model, scheme).items():
        module = model.get_submodule(name)
        record = round_rows(module.weight.detach(), type_scheme(gguf_type))
        module.weight.data = record.dequantize()
        records[name] = record
        log.info("%s rounded to GGUF %s (llama.cpp's type for it)", name, gguf_type)
    return records
