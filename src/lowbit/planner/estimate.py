"""The memory planner's estimate: a run's peak RAM (and accelerator memory) from config.json, the recipe and the
calibration size, before anything loads, resident or streamed (planner/plan.py decides and names the fixes).

Why: a run that runs out of memory after an hour of calibration (or gets OOM-killed without a word) is the worst
failure a quantizer can have on a large model. The estimate is a sum of named terms in bytes, per phase of the run
(load, capture, block loop, model-scope stages, export, evaluation); the peak is the largest phase plus the runtime
baseline. The stage terms live in planner/stages.py, the shapes in planner/shape.py. Calibrated against measured
peak RSS of real runs (benchmarks/plan_calibrate.py, results in benchmarks/results/plan_calibration.json).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import torch

from lowbit.planner.result import MIB, MemoryPlan
from lowbit.planner.shape import BlockShape, LinearShape, ModelShape
from lowbit.planner.stages import (
    F32,
    RunFacts,
    chain_plan,
    model_stage_state,
    replay_activations,
    stage_state,
)

if TYPE_CHECKING:
    from lowbit.config import QuantizeConfig

log = logging.getLogger(__name__)

# Peak RSS of a resident RTN run of a tiny model (llama hidden 64, 2 layers, SmolLM2's 49152-token tokenizer) minus
# its model, records and export terms: python + torch + transformers + tokenizer + calibration text + lowbit
# (benchmarks/plan_calibrate.py, 2-core x86 CPU, torch 2.13 CPU, transformers 5.25; importing lowbit alone: 380 MiB).
RUNTIME_BASELINE = 440 * MIB
# Host RSS the CUDA runtime libraries add to a process (cuBLAS, cuDNN, the context's host side) and the context on the
# device; assumed from common reports, not measured here.
CUDA_HOST_RUNTIME = 1536 * MIB
CUDA_CONTEXT = 512 * MIB
# Allocator overhead over what the terms allocate, on the terms allocated and freed block after block (not on the
# model, the records or mapped pages): with glibc's mmap threshold pinned (MALLOC_MMAP_THRESHOLD_=131072, so no heap
# retention) a GPTQ run peaked 6% above the live terms plus this slack (benchmarks/plan_calibrate.py's METHOD).
ALLOCATOR_SLACK = 0.10
# glibc serves allocations below its dynamic mmap threshold (at most 32 MiB) from the heap, and a heap fragmented by
# the block loop's batches, weight temporaries and Hessians is not returned: peak RSS then exceeds the peak of the live
# tensors by about this share of the loop's per-block terms (fitted on 6 GPTQ/SignRound/AWQ runs of models up to
# hidden 1024, benchmarks/results/plan_calibration.json). Where the loop's pieces (a batch of a chain, the largest
# linear's fp32 weight) are 32 MiB or more, they are mmapped and returned when freed: no retention is counted there,
# which is not measured (no such model fits this 2-core machine's runs).
HEAP_RETENTION = 0.7
GLIBC_MMAP_MAX = 32 * MIB
STATIC_TERMS = ("model_fp32", "non_block_fp32", "checkpoint_pages", "records")  # allocated once, kept
AUTO_STREAM_FRACTION = 0.85  # stream=auto streams when the resident run needs more than this share of the memory
DEFAULT_EVAL_SEQLEN = 2048  # run_eval.EvalSettings.seqlen
StreamOption = Literal["auto", "on", "off"]


# --- the estimate ----------------------------------------------------------------------------------------------


def _facts(shape: ModelShape, config: QuantizeConfig, available: int | None, chains_on_disk: bool) -> RunFacts:
    from lowbit.engine.pipeline import stage_groups

    stages = [spec.stage_class(spec.options, config.scheme) for spec in config.stages]
    return RunFacts(
        shape, config.scheme, config.nsamples, config.seqlen, config.engine.batch_size,
        torch.device(config.engine.device), stage_groups(stages), config.engine.quantized_input, available,
        chains_on_disk=chains_on_disk,
    )  # fmt: skip


def _record_bytes(linear: LinearShape, config: QuantizeConfig) -> int:
    """quantizer.QuantizedWeight: uint8 codes, scale (scheme dtype) and int32 zero per (row, group), g_idx, bias."""
    scheme = config.scheme
    groups = scheme.num_groups(linear.in_features)
    scale = torch.empty((), dtype=scheme.torch_scale_dtype).element_size()
    size = linear.out_features * (linear.in_features + groups * (scale + 4))
    size += linear.in_features * 4 if config.act_order_groups else 0
    size += linear.out_features * F32 if linear.bias else 0
    return size * linear.count


def _export_bytes(linear: LinearShape, config: QuantizeConfig, fmt: str) -> int:
    """The tensors export/blocks.py builds for one quantized linear (compressed-tensors scales in the model dtype,
    fp32 here; `fake`: the dequantized fp32 weight)."""
    bits, m, k = config.scheme.bits, linear.out_features, linear.in_features
    groups = config.scheme.num_groups(k)
    words = lambda n: -(-n * bits // 32) * 4  # noqa: E731 - bytes of n values packed into int32 words
    if fmt == "fake":
        size = m * k * F32
    elif fmt == "gptq":
        size = words(k) * m + groups * words(m) + groups * m * 2 + k * 4
    elif config.scheme.quantizes_activations:
        size = m * k + m * F32
    else:
        zeros = groups * words(m) if config.scheme.kind == "asym" else 0  # symmetric kinds store no zero points
        size = m * words(k) + m * groups * F32 + zeros + 16
    return size * linear.count


def _block_bytes(block: BlockShape, per_linear: Callable[[LinearShape], int]) -> int:
    return sum(per_linear(linear) for linear in block.linears)


def _eval_bytes(shape: ModelShape, seqlen: int) -> int:
    """eval/perplexity.py: one window, batch 1: the logits and cross_entropy's log-softmax, plus one block's
    activations."""
    inter = max(shape.intermediate_size, shape.moe_intermediate_size)
    return 2 * seqlen * shape.vocab_size * F32 + seqlen * (4 * shape.hidden_size + 3 * inter) * F32


def _loop_terms(facts: RunFacts, resident: dict[str, int]) -> dict[str, int]:
    """The block loop at its worst block: the larger of the engine's replay peak and a stage's peak."""
    worst: dict[str, int] = {}
    for group in facts.groups:
        if group[0].scope != "block":
            continue
        chains = chain_plan(facts, group)
        peak, during = chains.peak, chains.during_stages
        on_host = chains.count_peak and facts.device.type != "cuda"  # on CUDA a batch's activations are on the device
        replay = {"chains": peak, "replay_activations": replay_activations(facts) if on_host else 0}
        best_stage: dict[str, int] = {}
        for stage in group:
            host, _ = stage_state(facts, stage)
            if sum(host.values()) > sum(best_stage.values()):
                best_stage = host
        staged = {"chains": during, **best_stage}
        terms = {**resident, **(replay if sum(replay.values()) >= sum(staged.values()) else staged)}
        if sum(terms.values()) > sum(worst.values()):
            worst = terms
    return worst or dict(resident)


def _gpu_terms(facts: RunFacts) -> dict[str, int]:
    """engine.device=cuda: the block at fp32 on the device, one batch's activations, the stage's device state."""
    block = facts.block.params * F32
    stage_terms: dict[str, int] = {}
    for group in facts.groups:
        if group[0].scope != "block":
            facts.notes.append(f"the accelerator memory of model-scope stage '{group[0].name}' is not estimated")
            continue
        for stage in group:
            _, device = stage_state(facts, stage)
            if sum(device.values()) > sum(stage_terms.values()):
                stage_terms = device
    return {"cuda_context": CUDA_CONTEXT, "block_weights": block, "batch_activations": replay_activations(facts),
            **stage_terms}  # fmt: skip


def estimate(
    shape: ModelShape,
    config: QuantizeConfig,
    *,
    stream: bool,
    evaluate: bool = False,
    export_format: str = "auto",
    available: int | None = None,
    gpu_available: int | None = None,
    eval_seqlen: int = DEFAULT_EVAL_SEQLEN,
    eval_windows: int | None = None,
    chains_on_disk: bool | None = None,
) -> MemoryPlan:
    """The memory plan of `config` on a model of `shape`, resident (`stream=False`) or streamed block by block.

    Terms are bytes per phase on top of the runtime baseline; the resident phases follow today's engine (fp32 model,
    every block's records kept until the export), the streamed ones the design of lowbit's large-model notes
    (non-block tensors at fp32, one block read at its stored dtype and converted, records and export tensors of one
    block, one block's export group; with `evaluate`, the evaluation's own chains of `eval_windows` windows over all
    its texts, which a streamed run carries through the block loop). `chains_on_disk` (default: engine.offload ==
    "disk") counts the activation chains as files, of which RAM holds a batch at a time.
    """
    fmt = "compressed-tensors" if export_format == "auto" else export_format
    if chains_on_disk is None:
        chains_on_disk = config.engine.offload == "disk"
    facts = _facts(shape, config, available, chains_on_disk)
    captured = facts.chain_batch if chains_on_disk else facts.chain  # engine/capture.py fills one chain per batch
    block = facts.block
    quantizes = any(stage.kind == "quantizer" for group in facts.groups for stage in group)
    record = (lambda linear: _record_bytes(linear, config)) if quantizes else (lambda linear: 0)
    export_one = max(_block_bytes(b, lambda linear: _export_bytes(linear, config, fmt)) for b in shape.blocks)
    non_block = shape.non_block_params * F32
    phases: dict[str, dict[str, int]] = {}
    if stream:
        block_now = {
            "non_block_fp32": non_block,
            "block_read": block.params * shape.dtype_bytes,
            "block_fp32": block.params * F32,
            "block_records": _block_bytes(block, record),
            "export_group": export_one,  # the shard writer writes each block's group to disk at once
        }
        largest = max(shape.vocab_size * shape.hidden_size, block.params)
        phases["open"] = {"non_block_fp32": non_block, "tensor_read": largest * shape.dtype_bytes}
        if config.needs_data:
            phases["capture"] = {"non_block_fp32": non_block, "chains": captured}
        phases["block_loop"] = _loop_terms(facts, block_now)
        phases["export"] = {"non_block_fp32": non_block, "export_group": export_one}
        if evaluate:  # eval/streamed.py: before and after chains, plus one block's new output
            if eval_windows is None:
                facts.notes.append("the evaluation's window count is unknown: its chains are not counted")
            eval_chain = (eval_windows or 0) * eval_seqlen * shape.hidden_size * F32
            phases["block_loop"]["eval_chains"] = 3 * eval_chain
            phases["evaluation"] = {"non_block_fp32": non_block, "eval_chains": 2 * eval_chain,
                                    "eval_activations": _eval_bytes(shape, eval_seqlen)}  # fmt: skip
    else:
        model = shape.params * F32
        records = sum(_block_bytes(b, record) for b in shape.blocks)
        new_export = 0 if fmt == "fake" else export_one
        phases["load"] = {"model_fp32": model, "checkpoint_pages": shape.checkpoint_bytes}
        if config.needs_data:
            phases["capture"] = {"model_fp32": model, "chains": captured}
        phases["block_loop"] = _loop_terms(facts, {"model_fp32": model, "records": records})
        for group in facts.groups:
            if group[0].scope == "model":
                phases[f"{group[0].name}_stage"] = {"model_fp32": model, **model_stage_state(facts, group[0])}
        phases["export"] = {"model_fp32": model, "records": records, "export_group": new_export}
        if evaluate:
            phases["evaluation"] = {"model_fp32": model, "records": records,
                                    "eval_activations": _eval_bytes(shape, eval_seqlen)}  # fmt: skip
    _allocator_terms(phases, config, shape)
    baseline = RUNTIME_BASELINE + (CUDA_HOST_RUNTIME if facts.device.type == "cuda" else 0)
    gpu_terms = _gpu_terms(facts) if facts.device.type == "cuda" else {}
    blocked = None
    if stream:
        blocked = streaming_blocker(shape, facts)
    settings = {
        "recipe": config.recipe, "scheme": config.scheme.name, "nsamples": config.nsamples,
        "seqlen": config.seqlen, "batch_size": config.engine.batch_size, "device": config.engine.device,
        "export_format": fmt, "evaluate": evaluate, "chains_on_disk": chains_on_disk,
    }  # fmt: skip
    return MemoryPlan(
        shape, settings, stream, phases, baseline, available, gpu_terms, gpu_available, blocked=blocked,
        notes=list(dict.fromkeys(facts.notes)),
    )  # fmt: skip


def _allocator_terms(phases: dict[str, dict[str, int]], config: QuantizeConfig, shape: ModelShape) -> None:
    """Add the allocator's share to every phase: ALLOCATOR_SLACK of what it allocates and frees, and, where the loop's
    batches are small enough for glibc's heap, HEAP_RETENTION of the loop's per-block terms, kept by every later phase
    (a fragmented heap is not returned)."""
    # the pieces the loop allocates and frees: the largest linear's fp32 temporaries and the chains' batches
    piece = max(linear.out_features * linear.in_features for linear in shape.largest_block.linears) * F32
    if config.needs_data:
        piece = min(piece, min(config.engine.batch_size, config.nsamples) * config.seqlen * shape.hidden_size * F32)
    retained = 0
    for name, terms in phases.items():  # in the order the run goes through them
        dynamic = sum(v for k, v in terms.items() if k not in STATIC_TERMS)
        terms["allocator_slack"] = int(ALLOCATOR_SLACK * dynamic)
        if name == "block_loop" and piece < GLIBC_MMAP_MAX:
            retained = int(HEAP_RETENTION * dynamic)
        if retained:
            terms["heap_retention"] = retained


def streaming_blocker(shape: ModelShape, facts: RunFacts) -> str | None:
    """Why this run cannot stream (None: it can): a model-scope stage needs the whole model, or the family is not
    one the streaming reader loads exactly."""
    from lowbit.engine.skeleton import STREAMABLE_MODEL_TYPES

    if shape.model_type not in STREAMABLE_MODEL_TYPES:
        return f"streaming does not support model type '{shape.model_type}'"
    scoped = [group[0].name for group in facts.groups if group[0].scope == "model"]
    if scoped:
        return f"stage '{scoped[0]}' works on the whole model (model scope) and cannot stream"
    return None
