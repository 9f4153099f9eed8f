"""What each stage holds while it processes one block, and the activation chains the block loop keeps: the sizes the
memory planner (planner/plan.py) adds up, in bytes, read from the code of each stage (named below).

Why a table per stage: a stage's memory is decided by its implementation (GPTQ's Hessians and recorded calls,
SignRound's V and snapshot, AWQ's cached features), not by a formula a user could guess; each function here says
which code it mirrors so that a change there has an obvious place to be reflected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

from lowbit.planner.shape import BlockShape, LinearShape, ModelShape
from lowbit.scheme import ACT_BITS_OFF, QuantScheme

F32 = 4
SOLVE_COPIES = 2  # gptq/solve.py: the stage hands its H over (consume_h); two of Hd, L, Hinv, U live at once
SOLVE_WEIGHT_COPIES = 5  # gptq/solve.py: W0, its clone in _column_loop, codes (fp32), Q and one transient
RTN_WEIGHT_COPIES = 4  # quantizer.py: the fp32 weight, its grouped view padded, codes and the dequantized weight
IMATRIX_SEARCH_COPIES = 3  # imatrix/search.py: element weights, a candidate's fake-quant weight, its squared error
# signround/tune.py, per weight in fp32: weight clone, V, its grad, grouped W, QDQ out, rz, codes, the leaf and its
# grad (one copy under bf16 autocast, two in fp32), the best snapshot
SIGNROUND_WEIGHT_COPIES = 10
OMNIQUANT_WEIGHT_COPIES = 9  # omniquant/block.py: the fp32 base copy + LWC's clamp-aware fake-quant graph (~8 saved)
TEQ_WEIGHT_COPIES = 8  # teq/scales.py: the scaled weight's fake-quant graph per step (block-wise mode)
TRAIN_TOKEN_FLOATS = (12, 6)  # saved activations of one block's forward per token: 12 x hidden + 6 x intermediate
REPLAY_TOKEN_FLOATS = (4, 3)  # transient activations of one no-grad block forward per token


@dataclass
class RunFacts:
    """What the planner knows about one run before loading: the shape, the calibration size and the stages."""

    shape: ModelShape
    scheme: QuantScheme
    nsamples: int
    seqlen: int
    batch_size: int
    device: torch.device
    groups: list[list[Any]]  # stage instances grouped as engine/pipeline.py groups them
    quantized_input: bool
    available: int | None = None  # host memory the run may use (GPTQ's recorded calls depend on it)
    notes: list[str] = field(default_factory=list)
    chains_on_disk: bool = False  # engine.offload=disk: the chains are files, RAM holds a batch of them at a time

    @property
    def block(self) -> BlockShape:
        return self.shape.largest_block

    @property
    def chain(self) -> int:
        """One activation chain: [nsamples, seqlen, hidden] fp32 on CPU (engine/block_loop.py)."""
        return self.nsamples * self.seqlen * self.shape.hidden_size * F32

    @property
    def chain_batch(self) -> int:
        """One batch of a chain (engine.batch_size samples): what a chain on disk costs in RAM while it is read or
        written (engine/offload.py)."""
        return min(self.batch_size, self.nsamples) * self.seqlen * self.shape.hidden_size * F32

    @property
    def chain_in_ram(self) -> int:
        """What a new chain a stage makes (`ctx.run`, `ctx.chains.new`) holds in RAM: all of it, or on disk 0."""
        return 0 if self.chains_on_disk else self.chain

    def tokens_bytes(self, samples: int, per_token: tuple[int, int], itemsize: int = F32) -> int:
        hidden_coeff, inter_coeff = per_token
        inter = max(self.shape.intermediate_size, self.shape.moe_intermediate_size)
        return samples * self.seqlen * (hidden_coeff * self.shape.hidden_size + inter_coeff * inter) * itemsize

    def attention_probs(self, samples: int, itemsize: int) -> int:
        """Chunked causal attention keeps B x H x L^2 / 2 probabilities for its backward (engine/causal_attention.py);
        CUDA's SDPA kernels keep O(L)."""
        if self.device.type == "cuda":
            return 0
        return samples * self.shape.num_heads * self.seqlen * self.seqlen // 2 * itemsize


@dataclass
class ChainPlan:
    """Chains of one block group: at the peak of the engine's own replays, and resident while its stages run."""

    peak: int
    during_stages: int
    count_peak: int


def chain_plan(facts: RunFacts, group: list[Any]) -> ChainPlan:
    """engine/block_loop.py: q_in always (with data); fp_in and targets when a stage reads the float chain. Every
    replay (`ctx.run`) fills a new chain batch by batch while the old q_in and (through the BlockContext) the old
    fp_in are still referenced. Chains on disk hold one batch each in RAM while they are read or written: the
    replay's input batch and output batch, a stage's batch."""
    if not any(stage.needs_data for stage in group):
        return ChainPlan(0, 0, 0)
    has_quantizer = any(stage.kind == "quantizer" for stage in group)
    quantized = _chain_choice(group, facts.quantized_input)
    float_chain = not (quantized and has_quantizer) or any(stage.uses_float_chain for stage in group)
    if float_chain and quantized and has_quantizer:
        peak, during = 4, 3  # old q_in, old fp_in, targets, new q_in
    elif float_chain:
        peak, during = 2, 2  # fp_in (= q_in), targets
    else:
        peak, during = 2, 1  # q_in, new q_in
    if facts.chains_on_disk:
        return ChainPlan(2 * facts.chain_batch, facts.chain_batch, peak)
    return ChainPlan(peak * facts.chain, during * facts.chain, peak)


def _chain_choice(group: list[Any], default: bool) -> bool:
    wanted = {choice for stage in group if (choice := stage.preferred_quantized_input()) is not None}
    return wanted.pop() if len(wanted) == 1 else default


def replay_activations(facts: RunFacts) -> int:
    """One batch through a block without gradients (engine/context.py `run`), transient."""
    return facts.tokens_bytes(min(facts.batch_size, facts.nsamples), REPLAY_TOKEN_FLOATS)


def _largest(block: BlockShape) -> LinearShape:
    return max(block.linears, key=lambda linear: linear.out_features * linear.in_features)


def _weights_bytes(linear: LinearShape, copies: int) -> int:
    return linear.out_features * linear.in_features * F32 * copies


def stage_state(facts: RunFacts, stage: Any) -> tuple[dict[str, int], dict[str, int]]:
    """(host terms, accelerator terms) in bytes that `stage` holds on top of the chains while processing the largest
    block; released when its `process_block` returns (records are counted separately)."""
    handler = _HANDLERS.get(stage.name)
    if handler is None:
        facts.notes.append(f"no memory model for stage '{stage.name}': its state is not counted")
        return {}, {}
    return handler(facts, stage)


def _rtn(facts: RunFacts, stage: Any) -> tuple[dict[str, int], dict[str, int]]:
    temp = _weights_bytes(_largest(facts.block), RTN_WEIGHT_COPIES)
    return {"rtn_temporaries": temp}, {"rtn_temporaries": temp}


def _imatrix(facts: RunFacts, stage: Any) -> tuple[dict[str, int], dict[str, int]]:
    """methods/imatrix + common/energy.py: RTN's temporaries, plus the element weights and one candidate's
    fake-quant weight and error of the largest linear while its ranges are searched."""
    temp = _weights_bytes(_largest(facts.block), RTN_WEIGHT_COPIES + IMATRIX_SEARCH_COPIES)
    return {"imatrix_search": temp}, {"imatrix_search": temp}


def gptq_solve(facts: RunFacts, subset: list[LinearShape], exact: bool = False) -> tuple[int, int]:
    """(accumulated Hessians + the solve's workspace, the Hessians alone) of one true-sequential subset: one k x k
    H per linear of the subset (HessianAccumulator: fp32, or an fp64 sum with `exact`), all alive when the first is
    solved; the solve factors the fp32 H it is handed on CPU (solve.py)."""
    hessians = sum(linear.count * linear.in_features**2 * (2 * F32 if exact else F32) for linear in subset)
    k = max(linear.in_features for linear in subset)
    weights = max(_weights_bytes(linear, SOLVE_WEIGHT_COPIES) for linear in subset)
    return hessians + SOLVE_COPIES * k * k * F32 + weights, hessians + k * k * F32


def _gptq(facts: RunFacts, stage: Any) -> tuple[dict[str, int], dict[str, int]]:
    """methods/gptq/stage.py + passes.py. Pre-norm families with an `mlp` module record, for the passes that start
    there, the MLP's input and the residual (one chain each; nothing with the chains on disk) and, where it fits
    in a quarter of the free memory, the last linear's input (a chain at intermediate width); the quantized chain
    is then rebuilt from those records (a new chain, filled per batch) while they are alive."""
    host: dict[str, int] = {}
    exact = bool(getattr(stage.options, "exact_hessian", False))
    solve, device_hessians = max(gptq_solve(facts, subset, exact) for subset in facts.block.subsets())
    records = 0
    if facts.shape.model_type != "opt" and not facts.chains_on_disk:  # on disk: the passes replay, nothing kept
        records = facts.chain
        if facts.scheme.act_bits >= ACT_BITS_OFF:
            records += facts.chain
        last = facts.block.subsets()[-1]
        if len(last) == 1 and last[0].count == 1:
            inputs = facts.chain * last[0].in_features // facts.shape.hidden_size
            if facts.available is None or inputs <= facts.available // 4:
                records += inputs
            else:
                facts.notes.append("GPTQ will replay the MLP instead of recording its last linear's inputs")
        host["gptq_recorded_calls"] = records
    rebuild = facts.chain_in_ram if records else 0  # the quantized chain rebuilt from the records, filled per batch
    if rebuild > solve:
        host["gptq_chain_rebuild"] = rebuild
    else:
        host["gptq_hessians_and_solve"] = solve
    device = {"gptq_hessians": device_hessians} if facts.device.type == "cuda" else {}
    return host, device


def _training(facts: RunFacts, samples: int, autocast: str) -> int:
    itemsize = 2 if autocast in ("bf16", "fp16") else F32
    samples = min(samples, facts.nsamples)
    return facts.tokens_bytes(samples, TRAIN_TOKEN_FLOATS, itemsize) + facts.attention_probs(samples, itemsize)


def _signround(facts: RunFacts, stage: Any) -> tuple[dict[str, int], dict[str, int]]:
    """methods/signround/stage.py + tune.py: V, alpha, beta per linear with their graph and the best snapshot; a
    micro-batch's forward/backward; on CUDA the whole q_in and targets chains are moved to the device."""
    settings = stage.settings(facts.device)
    autocast = settings.autocast
    if facts.device.type == "cuda" and not torch.cuda.is_available() and stage.options.autocast == "auto":
        autocast = "bf16"  # planned from a machine without the GPU: assume a bf16 one (what auto picks there)
    state = facts.block.linear_weights * F32 * SIGNROUND_WEIGHT_COPIES
    train = _training(facts, settings.micro_batch_size, autocast)
    host = {"signround_state": state, "signround_activations": train}
    if stage.options.target_from == "student_input":
        host["signround_student_targets"] = facts.chain_in_ram
    if facts.device.type != "cuda":
        return host, {}
    device = {**host, "signround_chains_on_device": 2 * facts.chain}
    return {"signround_student_targets": host.get("signround_student_targets", 0)}, device


def _omniquant(facts: RunFacts, stage: Any) -> tuple[dict[str, int], dict[str, int]]:
    """methods/omniquant/*: the fp32 base copy of the block, LWC/LET's fake-quant graph, AdamW on the small factors,
    one batch's forward/backward, and the float block's outputs on q_in when aug_loss is on; DESV adds the thin SVD
    factors of every linear and the increment U B Vh."""
    from lowbit.methods.omniquant.stage import resolve_recipe

    family = SimpleNamespace(family="opt" if facts.shape.model_type == "opt" else facts.shape.model_type)
    resolved = resolve_recipe(stage.options, family, facts.scheme, facts.device)
    state = facts.block.linear_weights * F32 * OMNIQUANT_WEIGHT_COPIES
    terms = {f"{stage.name}_state": state, f"{stage.name}_activations": _training(facts, stage.options.batch_size,
                                                                                   resolved.autocast)}  # fmt: skip
    if resolved.aug_loss:
        terms[f"{stage.name}_aug_targets"] = facts.chain_in_ram
    if stage.name == "desv":
        terms["desv_svd"] = sum(
            linear.count * (min(linear.out_features, linear.in_features) * (linear.out_features + linear.in_features)
                            + 2 * linear.out_features * linear.in_features) * F32
            for linear in facts.block.linears
        )  # fmt: skip
    if facts.device.type != "cuda":
        return terms, {}
    return {k: v for k, v in terms.items() if k.endswith("aug_targets")}, terms


def _awq(facts: RunFacts, stage: Any) -> tuple[dict[str, int], dict[str, int]]:
    """methods/awq/stage.py: every group's input features ([n, L, k] fp32, once per distinct input), twice while they
    are concatenated; the Gram matrix (fp64) of a linear-only group; the clip search's fake-quant weights."""
    widths = {linear.input: linear.in_features for linear in facts.block.linears}
    features = sum(facts.chain * width // facts.shape.hidden_size for width in widths.values())
    gram = max(widths.values()) ** 2 * 8 if stage.options.linear_loss == "gram" else 0
    host = {"awq_features": 2 * features, "awq_gram_and_clip": gram + _weights_bytes(_largest(facts.block), 4)}
    return host, ({"awq_search": gram} if facts.device.type == "cuda" else {})


def _teq(facts: RunFacts, stage: Any) -> tuple[dict[str, int], dict[str, int]]:
    """methods/teq/*: block-wise (loss=mse) trains per-channel scales through the fake-quant block, like SignRound's
    data flow; model scope (loss=ce) is sized by `model_stage_state`."""
    state = facts.block.linear_weights * F32 * TEQ_WEIGHT_COPIES
    terms = {"teq_state": state, "teq_activations": _training(facts, stage.batch_size, "off")}
    return (terms, {}) if facts.device.type != "cuda" else ({}, terms)


def model_stage_state(facts: RunFacts, stage: Any) -> dict[str, int]:
    """A model-scope stage (TEQ with cross-entropy, InvarExplore) over the resident model: logits of one window
    (and their log-softmax and gradient), plus TEQ's saved activations of every block (one batch, no checkpointing
    assumed). Coarse: these stages cannot stream, and their CPU runs are small models."""
    shape = facts.shape
    logits = 3 * facts.seqlen * shape.vocab_size * F32
    if stage.name == "teq":
        per_block = _training(facts, stage.batch_size, "off")
        return {"teq_model_activations": shape.num_layers * per_block, "teq_logits": logits * stage.batch_size}
    return {f"{stage.name}_forward": replay_activations(facts) + logits}


_HANDLERS = {
    "rtn": _rtn,
    "imatrix": _imatrix,
    "gptq": _gptq,
    "signround": _signround,
    "omniquant": _omniquant,
    "let": _omniquant,
    "desv": _omniquant,
    "awq": _awq,
    "teq": _teq,
}
