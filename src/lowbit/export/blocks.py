"""An export's tensors one decoder block at a time, and what lies outside the blocks: the one export path.

Why: a streamed run (lowbit's design notes) has one block in memory when it finishes; the in-memory run is the same
loop over resident blocks, so both write the same files. `block_export_tensors` gives exactly the tensors a
whole-model export holds under one block's prefix: the quantized linears' packed tensors (or, for `fake`, their
dequantized weights) and the block's float remainder (norms, biases, linears left in float). `remainder_tensors`
gives everything else (embeddings, final norm, lm_head, records outside the blocks). The `fake` tensors follow
`save_pretrained`: `_keys_to_ignore_on_save` dropped, tied weights removed, weight conversions reverted (per block,
as transformers does per shard for offloaded models).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from lowbit.arch import arch_for
from lowbit.errors import LowbitError
from lowbit.export import compressed_tensors as ct
from lowbit.export import gptq
from lowbit.export.shards import ShardWriter
from lowbit.quantizer import QuantizedWeight

log = logging.getLogger(__name__)

FAKE = "fake"


@dataclass(frozen=True)
class ExportContext:
    """What a block's export tensors depend on besides the block: the format, its options, the model's identity.

    `model` may be a skeleton with meta blocks (a streamed run): only its config, class, tied-weight keys and
    weight conversions are read here, never the tensors of a block other than the one being exported.
    """

    fmt: str  # "fake" | "compressed-tensors" | "gptq"
    model: nn.Module
    dtype: torch.dtype  # the model dtype (of its embeddings): compressed-tensors scales are written in it
    packing: str = "dense"  # compressed-tensors word layout
    packer: str = "lowbit"
    act_bits: int = 16


def export_context(
    fmt: str, model: nn.Module, *, packing: str = "dense", packer: str = "lowbit", act_bits: int = 16
) -> ExportContext:
    """The context of `model`'s export as `fmt`; the dtype is that of the input embeddings, as the plan's."""
    return ExportContext(fmt, model, model.get_input_embeddings().weight.dtype, packing, packer, act_bits)


def block_prefixes(model: nn.Module) -> list[str]:
    """Full module names of the decoder blocks (none for a family without an ArchSpec: all is remainder)."""
    try:
        arch = arch_for(model)
    except LowbitError:
        return []
    return [arch.block_name(index) for index in range(len(arch.blocks(model)))]


def linear_tensors(context: ExportContext, name: str, record: QuantizedWeight) -> dict[str, Tensor]:
    """The packed tensors of one quantized linear, keyed by full name (its bias is in the float remainder)."""
    if context.fmt == "gptq":
        layer = gptq.layer_tensors(record)
    elif ct.ct_format(context.act_bits) == ct.INT_QUANTIZED:
        layer = ct.int8_layer_tensors(record, context.dtype)
    else:
        layer = ct.layer_tensors(record, context.dtype, context.packing, context.packer)
    return {f"{name}.{key}": tensor for key, tensor in layer.items()}


def _inside(name: str, prefix: str) -> bool:
    return name.startswith(f"{prefix}.")


def _ignored_on_save(model: nn.Module) -> set[str]:
    return set(getattr(model, "_keys_to_ignore_on_save", None) or ())


def _revert_conversions(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers' reverse weight conversion (checkpoint names), as save_pretrained applies it."""
    if not isinstance(model, PreTrainedModel) or not state:
        return state
    from transformers.core_model_loading import revert_weight_conversion

    return dict(revert_weight_conversion(model, state))


def _packed_part(
    context: ExportContext, state: Mapping[str, Tensor], records: Mapping[str, QuantizedWeight]
) -> dict[str, Tensor]:
    """The float tensors of `state` minus the quantized weights and tied duplicates, then the packed tensors."""
    skip = {f"{name}.weight" for name in records}
    floats = _untied({key: t for key, t in state.items() if key not in skip})
    tensors = {key: t.detach() for key, t in floats.items()}  # the writer makes them contiguous CPU tensors
    for name, record in records.items():
        for key, tensor in linear_tensors(context, name, record).items():
            if key in tensors:
                raise LowbitError(f"export tensor {key} is both a float tensor and a packed one: rename clash")
            tensors[key] = tensor
    return tensors


def block_export_tensors(
    context: ExportContext, block_prefix: str, records: Mapping[str, QuantizedWeight], block: nn.Module
) -> dict[str, Tensor]:
    """Every export tensor under `block_prefix`: the block's quantized linears and its float remainder.

    `records` may be the whole model's (only those inside the block are used); `block` must hold real tensors.
    """
    state = {f"{block_prefix}.{key}": t for key, t in block.state_dict().items()}
    if context.fmt == FAKE:
        ignored = _ignored_on_save(context.model)
        state = {key: t.detach().contiguous() for key, t in state.items() if key not in ignored}
        return _revert_conversions(context.model, state)
    inside = {name: record for name, record in records.items() if _inside(name, block_prefix)}
    return _packed_part(context, state, inside)


def _untied(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`state` without tied duplicates (same storage): the first name wins, as the packed writer always did."""
    kept: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, tensor in state.items():
        pointer = tensor.untyped_storage().data_ptr() if tensor.numel() and tensor.device.type != "meta" else -1
        if pointer != -1 and pointer in seen:
            continue  # tied weight (lm_head = embed_tokens): transformers re-ties it from the config
        seen.add(pointer)
        kept[key] = tensor
    return kept


def remainder_tensors(
    context: ExportContext, model: nn.Module, records: Mapping[str, QuantizedWeight], block_prefixes: list[str]
) -> dict[str, Tensor]:
    """The export tensors outside the blocks: embeddings, final norm, lm_head, and records outside any block."""
    if context.fmt == FAKE:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        ignored = _ignored_on_save(model)
        outside = {
            key: t
            for key, t in model.state_dict().items()
            if key not in ignored and not any(_inside(key, prefix) for prefix in block_prefixes)
        }
        if isinstance(model, PreTrainedModel):
            outside = remove_tied_weights_from_state_dict(outside, model)
        return _sorted(_revert_conversions(model, {key: t.detach().contiguous() for key, t in outside.items()}))
    outside_records = {
        name: record for name, record in records.items() if not any(_inside(name, p) for p in block_prefixes)
    }
    state = {k: t for k, t in model.state_dict().items() if not any(_inside(k, p) for p in block_prefixes)}
    return _sorted(_packed_part(context, state, outside_records))


def _sorted(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """By name: the shard layout must not depend on how the model was built (loaded whole, or a skeleton)."""
    return dict(sorted(tensors.items()))


def resident_groups(
    context: ExportContext, model: nn.Module, records: Mapping[str, QuantizedWeight]
) -> Iterator[dict[str, Tensor]]:
    """Each resident block's export tensors in order, built only when the writer asks for the next one."""
    for prefix in block_prefixes(model):
        yield block_export_tensors(context, prefix, records, model.get_submodule(prefix))


def write_weights(
    directory: Path,
    context: ExportContext,
    model: nn.Module,
    records: Mapping[str, QuantizedWeight],
    max_shard_bytes: int,
    index_metadata: dict[str, Any] | None = None,
    *,
    writer: ShardWriter | None = None,
) -> list[str]:
    """The weights: each block through the shard writer, then the remainder; returns the files written.

    A streamed run passes the `writer` its blocks already went to (the model's blocks are released by then)."""
    if writer is None:
        writer = ShardWriter(directory, max_shard_bytes)
        for group in resident_groups(context, model, records):
            writer.add_block(group)
    return writer.finish(remainder_tensors(context, model, records, block_prefixes(model)), index_metadata)
