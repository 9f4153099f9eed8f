"""AWQ as a block-scope transform stage (see docs/methods.md): activation-aware scale search, exact fold, auto-clip.

Per block: record the group inputs (and the inspected modules' call arguments) on the quantized chain (`ctx.inputs`,
the inputs the following quantizer sees, as llm-compressor; `search_inputs=float` uses llm-awq's float chain
`ctx.fp_inputs`), search a scale per `ArchSpec` scale group against the block's original weights, fold every scale
exactly into the previous op (`methods/common/fold.py`), then clamp the float weights per (row, group)
(`methods/awq/clip.py`). Any quantizer stage follows (awq+rtn, awq+gptq, awq+signround).

`search_samples` runs the attention/MLP replay searches on evenly spaced whole calibration samples (the candidate
scales' x̄ and the Gram losses of the linear-only groups still cover every token). The default is 8 (llm-awq uses all):
measured on SmolLM2 W4G64 at 128 x 512, 8 samples give the same perplexity in a fraction of the time.
The quantized-chain default is a measured departure from llm-awq: better perplexity than the float chain at
W3G64 and W4G64 on SmolLM2, and faster (no float-chain replay to record features on).
Numbers: benchmarks/results/gptq-awq.md.

The quantizer inside the search is the run's scheme with `include_zero` set by the `include_zero` option
(default False: llm-awq's raw min/max asymmetric preset, docs/methods.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lowbit.arch import ScaleGroup
from lowbit.engine import BlockContext, BlockStage
from lowbit.engine.context import move_to
from lowbit.engine.precision import autocast, resolve_autocast
from lowbit.errors import LowbitError
from lowbit.methods.awq.clip import apply_clip, clip_applies, fake_quant_rows, sample_tokens, search_clip
from lowbit.methods.awq.options import AWQOptions
from lowbit.methods.awq.ranks import global_tokens, mean_abs, reduce_losses, sampled_rows, token_mean
from lowbit.methods.awq.search import (
    block_gram,
    first_argmin,
    gram_loss,
    normalised_scales,
    replay_samples,
    spaced_samples,
    weight_mean,
)
from lowbit.methods.common.fold import fold_group
from lowbit.presets import RecipePreset
from lowbit.quantizer import fake_quant
from lowbit.scheme import QuantScheme

log = logging.getLogger(__name__)


class _Inputs:
    """Hooks that record each group's input features and each inspected module's call arguments."""

    def __init__(self, block: nn.Module, keys: dict[str, str], inspected: list[str]) -> None:
        self.features: dict[str, list[Tensor]] = {key: [] for key in set(keys.values())}
        self.calls: dict[str, tuple[bool, tuple, dict]] = {}
        self.handles = []
        for key in self.features:
            self.handles.append(block.get_submodule(key).register_forward_hook(self._feature_hook(key)))
        for name in inspected:
            hook = self._call_hook(name)
            self.handles.append(block.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))

    def _feature_hook(self, key: str):
        def hook(_module: nn.Module, args: tuple, _out: Any) -> None:
            self.features[key].append(args[0].detach().to("cpu", torch.float32))

        return hook

    def _call_hook(self, name: str):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            if name not in self.calls:
                positional = bool(args)
                rest = args[1:] if positional else ()
                extra = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                self.calls[name] = (positional, tuple(a.detach() if isinstance(a, Tensor) else a for a in rest), extra)

        return hook

    def remove(self) -> dict[str, Tensor]:
        for handle in self.handles:
            handle.remove()
        return {key: torch.cat(parts) for key, parts in self.features.items()}


def _versions(block: nn.Module) -> tuple[int, ...]:
    """The in-place version counters of a block's tensors: they change whenever any stage writes a weight."""
    return tuple(t._version for t in (*block.parameters(), *block.buffers()))


def _feature_keys(ctx: BlockContext) -> dict[str, str]:
    """Linear name -> the linear whose input it shares (the first of its scale group), for caching once."""
    keys = {name: name for name in ctx.linears()}
    for group in ctx.arch.scale_groups:
        for name in group.linears:
            keys[name] = group.linears[0]
    return keys


class AWQ(BlockStage):
    """Activation-aware weight quantization's scaling and clipping (Lin et al.; mit-han-lab/llm-awq)."""

    name: ClassVar[str] = "awq"
    kind: ClassVar[str] = "transform"
    needs_data: ClassVar[bool] = True
    summary: ClassVar[str] = "AWQ: activation-aware scales folded into the previous op, then auto-clip"
    data_parallel: ClassVar[bool] = True  # x̄, Gram matrices and losses summed over the ranks (methods/awq/ranks.py)
    experts_reason: ClassVar[str] = (
        "its FFN scales fold into the norm that also feeds the float mixture-of-experts router, and its search and "
        "clipping are not implemented over per-expert linears that see only their routed tokens"
    )
    Options: ClassVar[type] = AWQOptions
    supports_scheme_mix: ClassVar[bool] = True  # searches and clips each linear on its own scheme (scheme_for)

    def __init__(self, options: Any, scheme: QuantScheme) -> None:
        super().__init__(options, scheme)
        self.validate(options, scheme)
        self.search_scheme = dataclasses.replace(scheme, include_zero=options.include_zero)
        self.uses_float_chain = options.search_inputs == "float"
        self.results: dict[str, dict[str, Any]] = {}  # block name -> scales and clips (docs/methods.md, AWQ), on CPU
        self._observed: tuple | None = None  # (block index, weight versions, features, calls) from observe_targets

    @classmethod
    def validate(cls, options: AWQOptions, scheme: QuantScheme) -> None:
        if options.n_grid < 1 or options.clip_grid < 1 or not 0 < options.clip_max_shrink < 1:
            raise LowbitError("awq needs n_grid >= 1, clip_grid >= 1 and 0 < clip_max_shrink < 1")
        count = options.search_samples
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise LowbitError(
                f"awq.search_samples must be a positive number of calibration samples (or none for all), got {count!r}"
            )

    def artifacts(self) -> dict[str, Tensor]:
        """docs/methods.md, AWQ: every scale (`awq.scale.<block>.<previous op>`, its linears are in the run record) and
        every clip threshold per (row, group) (`awq.clip.<block>.<linear>`), so a later run can reuse them."""
        out: dict[str, Tensor] = {}
        for block, result in self.results.items():
            for prev, _linears, s in result["scales"]:
                out[f"awq.scale.{block}.{prev}"] = s
            for name, t in result["clips"].items():
                out[f"awq.clip.{block}.{name}"] = t
        return out

    def search_scheme_for(self, block_name: str, name: str) -> QuantScheme:
        """The quantizer of the search and the clip for one linear: its own scheme under a per-linear plan (a mixed
        plan or a GGUF mix), with `include_zero` from the options."""
        return dataclasses.replace(self.scheme_for(block_name, name), include_zero=self.options.include_zero)

    def precision(self, ctx: BlockContext) -> str:
        """The resolved autocast mode of the grid search's forwards on this block's device."""
        return resolve_autocast(self.options.autocast, ctx.device)

    # -- the inspected module f(x) ---------------------------------------------------------------------
    def _call(self, ctx: BlockContext, module: nn.Module, call: tuple | None, x: Tensor) -> Tensor:
        if call is None:
            out = module(x)
        else:
            positional, rest, extra = call
            extra = {k: move_to(v, ctx.device) for k, v in extra.items()}
            rest = tuple(move_to(v, ctx.device) for v in rest)
            out = module(x, *rest, **extra) if positional else module(hidden_states=x, **extra)
        return (out[0] if isinstance(out, tuple) else out).float()

    @torch.no_grad()
    def _loss(
        self, ctx: BlockContext, module: nn.Module, call: tuple | None, x: Tensor, y0: list[Tensor]
    ) -> tuple[float, int]:
        """Squared error of the module (forward in the search precision, output fp32) to the fp32 targets: its sum
        and element count (their ratio is the mean; a data-parallel run adds every rank's first)."""
        total, count = 0.0, 0
        for part, want in zip(ctx.batches(x.shape[0]), y0, strict=True):
            with autocast(self.precision(ctx), ctx.device):
                out = self._call(ctx, module, call, ctx.batch(x, part))
            total += float((out - want.to(out.device)).double().square().sum())
            count += want.numel()
        return total, count

    @torch.no_grad()
    def grid_losses(
        self,
        ctx: BlockContext,
        group: ScaleGroup,
        x: Tensor,
        call: tuple | None,
        nsamples: int | None = None,
        span: tuple[int, int] | None = None,
    ) -> tuple[list[float], list[Tensor], int | None]:
        """docs/methods.md, AWQ's loss at every ratio r = i/n_grid for one group on its cached inputs x ([n, L, k], or
        [n * L, k] where the block flattens tokens; `nsamples` = n). Returns the losses, the candidate scales (CPU)
        and the samples the loss covered: a replayed module runs on `search_samples` of them (`replay_samples`),
        the Gram loss and x̄ always cover every token. The weights are restored. In a data-parallel run (`span`, see
        `replay_samples`) x is this rank's slice and every sum over tokens covers every rank's (awq/ranks.py)."""
        module = ctx.block.get_submodule(group.inspect)
        linears = [ctx.block.get_submodule(name) for name in group.linears]
        originals = [linear.weight.detach().clone() for linear in linears]
        gram = None
        if self.options.linear_loss == "gram" and group.linears == (group.inspect,):
            gram = ctx.group.sum(block_gram(ctx, x))  # the inspected linear itself: its loss is quadratic in E
            tokens = global_tokens(x, ctx.group)
            y0: list[Tensor] = []
            replay, used = x, replay_samples(x, nsamples, None, call, span)[1]
        else:
            replay, used = replay_samples(x, nsamples, self.options.search_samples, call, span)
            y0 = [self._call(ctx, module, call, ctx.batch(replay, p)).cpu() for p in ctx.batches(replay.shape[0])]
        xbar = mean_abs(x, ctx.group).to(ctx.device)
        schemes = [self.search_scheme_for(ctx.name, name) for name in group.linears]
        # x̄ and w̄ are per group: a group whose linears hold different schemes (a `fake` mixed plan) takes the first's
        wbar = weight_mean(linears, schemes[0]).to(ctx.device) if self.options.duo_scaling else None
        losses: list[float] = []
        sums: list[tuple[float, int]] = []  # the replay losses' (sum, count), reduced over the ranks at the end
        candidates: list[Tensor] = []
        try:
            for i in range(self.options.n_grid):
                s = normalised_scales(xbar, i / self.options.n_grid, wbar)
                for linear, w, scheme in zip(linears, originals, schemes, strict=True):
                    q = fake_quant(w.float() * s[None, :], scheme, ste="identity") / s[None, :]
                    linear.weight.copy_(q.to(w.dtype))
                if gram is None:
                    sums.append(self._loss(ctx, module, call, replay, y0))
                else:
                    losses.append(gram_loss(linears[0].weight - originals[0], gram, tokens))
                candidates.append(s.cpu())
        finally:
            for linear, w in zip(linears, originals, strict=True):
                linear.weight.copy_(w)
        if gram is None:
            losses = reduce_losses(sums, ctx.group)
        return losses, candidates, used

    def search_scale(
        self,
        ctx: BlockContext,
        group: ScaleGroup,
        x: Tensor,
        call: tuple | None,
        nsamples: int | None = None,
        span: tuple[int, int] | None = None,
    ) -> tuple[Tensor, dict[str, Any]]:
        """The grid search of docs/methods.md for one group (`grid_losses`): the scale of the first smallest loss."""
        losses, candidates, used = self.grid_losses(ctx, group, x, call, nsamples, span)
        best = first_argmin(losses)
        if best is None:
            raise LowbitError(f"AWQ scale search for {ctx.name}.{group.prev} produced no finite loss: check the model")
        info = {
            "ratio": best / self.options.n_grid,
            "loss": losses[best],
            "loss_r0": losses[0],
            "linears": list(group.linears),
            "search_samples": used,
        }
        return candidates[best], info

    def group_inputs(
        self, ctx: BlockContext, inputs: Tensor
    ) -> tuple[list[ScaleGroup], dict[str, str], dict[str, Tensor], dict[str, tuple]]:
        """Run the block (current weights) on `inputs` once, recording every group's input features: the block's
        groups, linear -> feature key, the features by key, and each inspected module's call arguments."""
        with self._record(ctx):
            ctx.run(inputs)
        observed = self._observed_inputs(ctx)
        assert observed is not None  # nothing ran between the recording and here
        return observed

    @contextlib.contextmanager
    def _record(self, ctx: BlockContext) -> Iterator[None]:
        recorder = _Inputs(ctx.block, _feature_keys(ctx), sorted({g.inspect for g in ctx.arch.groups_for(ctx.block)}))
        try:
            yield
        finally:
            features = recorder.remove()
        self._observed = (ctx.index, _versions(ctx.block), features, recorder.calls)

    def observe_targets(self, ctx: BlockContext) -> contextlib.AbstractContextManager:
        """With the float chain (llm-awq's search inputs) the engine's target forward is exactly `group_inputs`'s
        forward: record the features there, one block forward saved."""
        return self._record(ctx) if self.options.search_inputs == "float" else contextlib.nullcontext()

    def _observed_inputs(self, ctx: BlockContext) -> tuple | None:
        """What `observe_targets` recorded for this block, if no stage has changed a weight of it since."""
        observed, self._observed = self._observed, None
        if observed is None or observed[0] != ctx.index or observed[1] != _versions(ctx.block):
            return None
        return ctx.arch.groups_for(ctx.block), _feature_keys(ctx), observed[2], observed[3]

    def process_block(self, ctx: BlockContext) -> None:
        inputs = ctx.fp_inputs if self.options.search_inputs == "float" else ctx.inputs
        if inputs is None:
            raise LowbitError("AWQ needs calibration data; pass --dataset (or 'builtin' for the offline default)")
        observed = self._observed_inputs(ctx) if self.options.search_inputs == "float" else None
        # quantized chain unless search_inputs=float
        groups, keys, features, calls = observed or self.group_inputs(ctx, inputs)
        skipped = [g.prev for g in ctx.arch.scale_groups if g not in groups]

        scales: dict[str, Tensor] = {}
        group_metrics: dict[str, Any] = {}
        span = ctx.group.offset(inputs.shape[0]) if ctx.group.distributed else None  # this rank's samples among all
        for group in groups:  # all searched on the unscaled block, then folded (as the reference)
            x = features[keys[group.linears[0]]]
            scales[group.prev], group_metrics[group.prev] = self.search_scale(
                ctx, group, x, calls.get(group.inspect), inputs.shape[0], span
            )
        for group in groups:
            s = scales[group.prev]
            fold_group(ctx.block, group, s, arch=ctx.arch)
            key = keys[group.linears[0]]
            features[key] = features[key] / s
        ctx.metrics["awq_scale"] = {**group_metrics, **({"skipped": skipped} if skipped else {})}
        ctx.metrics["awq_autocast"] = self.precision(ctx)
        clips = self._clip(ctx, features, keys) if self.options.clip else {}
        self.results[ctx.name] = {
            "scales": [(g.prev, g.linears, scales[g.prev]) for g in groups],
            "clips": clips,
        }

    @torch.no_grad()
    def _clip(self, ctx: BlockContext, features: dict[str, Tensor], keys: dict[str, str]) -> dict[str, Tensor]:
        """Auto-clip every linear but q/k on its (scaled) input features; returns the thresholds."""
        clips: dict[str, Tensor] = {}
        clip_metrics: dict[str, Any] = {}
        for name, linear in ctx.linears().items():
            if not clip_applies(name):
                continue
            if ctx.group.distributed:  # the global stride over every rank's tokens
                x = sampled_rows(features[keys[name]], self.options.clip_tokens, ctx.group)
            else:
                x = sample_tokens(features[keys[name]], self.options.clip_tokens)
            scheme = self.search_scheme_for(ctx.name, name)
            t, err, err0 = search_clip(
                linear.weight,
                x,
                scheme,
                grid=self.options.clip_grid,
                max_shrink=self.options.clip_max_shrink,
                token_mean=token_mean(ctx.group, x.shape[0]),
            )
            w = apply_clip(linear.weight, t, scheme.group_size)
            clipped = int((w != linear.weight.float()).sum())
            linear.weight.copy_(w.to(linear.weight.dtype))
            clips[name] = t
            clip_metrics[name] = {"err": float(err.mean()), "err_unclipped": float(err0.mean()), "clipped": clipped}
        ctx.metrics["awq_clip"] = clip_metrics
        return clips


# `--recipe awq-student+gptq`: AWQ searched on the inputs the following quantizer sees, without clip (measured for
# awq+gptq at W3/W4 g64 on SmolLM2 in benchmarks/results/gptq-awq.md; the default keeps the clip search).
RECIPES: dict[str, RecipePreset] = {
    "awq-student": RecipePreset(
        "awq-student",
        "awq",
        {"search_inputs": "student", "clip": False},
        summary="AWQ on the quantized chain without clip (as llm-compressor), for awq-student+gptq",
    )
}

__all__ = [
    "AWQ",
    "AWQOptions",
    "fake_quant_rows",
    "first_argmin",
    "normalised_scales",
    "replay_samples",
    "spaced_samples",
    "weight_mean",
]
