"""The GGUF checks, run before calibration (scheme, family, tokenizer, shapes) and again on the records at export.

`--format gguf` needs a `gguf:<type>` scheme (the quantizer must put codes on the type's grid while tuning, so
the writer never re-derives a code), weight-only; the family must be one llama.cpp runs and lowbit writes; every
quantized linear's in_features must be a multiple of the type's block.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit.arch import arch_for
from lowbit.errors import LowbitError
from lowbit.export.gguf.arch import family_problem
from lowbit.export.gguf.mixes import mix_schemes
from lowbit.export.gguf.vocab import vocab_problem
from lowbit.formats.gguf_types import GGUF_MIXES, GGUF_TYPES
from lowbit.quantizer import QuantizedWeight
from lowbit.scheme import QuantScheme

GGUF_FORMAT = "gguf"


def check_gguf_scheme(fmt: str, scheme: QuantScheme) -> None:
    """`--format gguf` with a scheme that is not a GGUF type (or quantizes activations) is refused at once."""
    if fmt != GGUF_FORMAT:
        return
    types = ", ".join(f"gguf:{t}" for t in (*GGUF_TYPES, *GGUF_MIXES))
    if scheme.quantizes_activations:
        raise LowbitError(
            f"scheme {scheme.name} quantizes activations, which GGUF cannot hold (llama.cpp quantizes activations "
            f"itself): use a weight-only GGUF scheme ({types}), or --format fake"
        )
    if scheme.gguf is None:
        raise LowbitError(
            f"--format gguf stores GGUF block types, and {scheme.name} is not one: use --scheme gguf:<type> "
            f"({types}), so every method tunes on the grid the file stores"
        )
    group = scheme.gguf_type.group  # type: ignore[union-attr]
    if scheme.group_size != group:
        raise LowbitError(f"GGUF {scheme.gguf} needs groups of {group}: use --scheme gguf:{scheme.gguf}")


def preflight_gguf(model: nn.Module, linears: dict[str, tuple[int, int]], scheme: QuantScheme, tokenizer: Any) -> None:
    """Everything but the codes: scheme, family, tokenizer (when given), each linear's width against the block."""
    check_gguf_scheme(GGUF_FORMAT, scheme)
    problem = family_problem(model)
    if problem:
        raise LowbitError(problem)
    if scheme.gguf_mix is not None:
        mix_schemes(model, arch_for(model), scheme)  # refuses what no mix rule holds (MoE, widths) before calibration
    if tokenizer is not None:
        problem = vocab_problem(tokenizer)
        if problem:
            raise LowbitError(problem)
    # a mix falls back from K types to legacy ones where a row is not a multiple of 256: 32 is what it needs
    block = 32 if scheme.gguf_mix else scheme.gguf_type.block  # type: ignore[union-attr]
    for name, (_, k) in linears.items():
        if k % block:
            raise LowbitError(
                f"{name} has in_features {k}, not a multiple of the GGUF {scheme.gguf} block of {block}: "
                "this model cannot be stored in that type; use --format compressed-tensors"
            )


def check_gguf_records(records: dict[str, QuantizedWeight]) -> None:
    """At export: every record is a GGUF scheme (blocks.py checks each one's grid while packing)."""
    if not records:
        raise LowbitError("nothing was quantized, so there is no GGUF weight type to write: run a quantizer recipe")
    for name, record in records.items():
        if record.scheme.gguf is None:
            raise LowbitError(
                f"{name} was quantized with {record.scheme.name}, not a GGUF type: use --scheme gguf:<type>"
            )
        if record.g_idx is not None:
            k = record.shape[1]
            if not torch.equal(record.g_idx.cpu().long(), torch.arange(k) // record.scheme.group_size):
                raise LowbitError(
                    f"{name} has an act-order g_idx, which GGUF cannot store: use --opt gptq.static_groups=true or "
                    "turn act-order off with --format gguf"
                )
