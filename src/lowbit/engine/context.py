"""What a block-scope stage sees: one decoder block, its cached inputs and targets, and helpers to run it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.actquant import activation_quant
from lowbit.arch import ArchSpec
from lowbit.distributed.group import Group
from lowbit.engine.offload import Chain, ChainStore
from lowbit.engine.precision import autocast
from lowbit.errors import LowbitError
from lowbit.quantizer import QuantizedWeight
from lowbit.scheme import QuantScheme


def move_to(value: Any, device: torch.device) -> Any:
    """Move tensors (also inside tuples) to `device`; leave everything else as is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(move_to(v, device) for v in value)
    return value


def call_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """Call a decoder block and return its hidden-state output (blocks of older versions return tuples)."""
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@dataclass
class BlockContext:
    """One decoder block during the block loop.

    `inputs` is what the student block sees (the quantized chain by default), `fp_inputs` the float chain and
    `targets` the float block's outputs on `fp_inputs`, cached once. All three are fp32 chains on CPU, tensors or
    (engine.offload=disk) `DiskChain`s that read what is indexed: a stage moves one batch at a time with `batch()` and
    makes new chains with `chains.new` (or `run`), never assuming the whole chain is in memory. `autocast` is the
    precision of `run` (the engine's replays): "off" (fp32) unless the tuning stage asked for its own reduced
    precision (`BlockStage.replay_autocast`). A quantizer stage fills `quantized` (relative linear name -> record);
    the engine then writes the dequantized weights into the block. `outputs`: the block's outputs on `inputs`
    with its final weights (an fp32 chain), set by the last stage when it computed them on the way (GPTQ's residual
    chain); the engine then takes them as the quantized chain instead of replaying the block.
    """

    index: int
    name: str
    block: nn.Module
    arch: ArchSpec
    scheme: QuantScheme
    kwargs: dict[str, Any]
    device: torch.device
    batch_size: int
    seed: int
    inputs: Chain | None = None
    fp_inputs: Chain | None = None
    targets: Chain | None = None
    autocast: str = "off"
    compile: bool = False  # whether tuning stages compile their block forward (engine.compile)
    outputs: Chain | None = None
    chains: ChainStore = field(default_factory=ChainStore)  # where new chains go (engine.offload)
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    # the ranks of a data-parallel run: the chains hold this rank's slice of the samples, and a stage reduces what
    # it sums over samples through it (default: the single process, where every reduction is the identity)
    group: Group = field(default_factory=Group)

    @property
    def nsamples(self) -> int:
        return 0 if self.inputs is None else self.inputs.shape[0]

    def linears(self) -> dict[str, nn.Linear]:
        """The block's linears by relative name, in true-sequential order."""
        return self.arch.linears(self.block)

    def act_quant(self) -> contextlib.AbstractContextManager:
        """This block's activation quantizers for a W-A scheme (docs/methods.md); a no-op for weight-only schemes.

        Use it around forwards of the quantized student (`with ctx.act_quant(): ...`), never around the float targets.
        """
        return activation_quant(self.block, self.arch, self.scheme.act_bits)

    def generator(self, salt: int = 0) -> torch.Generator:
        """A private RNG for this block, so results never depend on global RNG state."""
        return torch.Generator().manual_seed(self.seed * 100_003 + self.index * 101 + salt)

    def device_kwargs(self) -> dict[str, Any]:
        return {key: move_to(value, self.device) for key, value in self.kwargs.items()}

    def batches(self, n: int | None = None) -> Iterator[slice]:
        """Consecutive sample slices of at most `batch_size`."""
        total = self.nsamples if n is None else n
        for start in range(0, total, self.batch_size):
            yield slice(start, min(start + self.batch_size, total))

    def batch(self, tensor: Chain, index: slice | torch.Tensor | list[int]) -> torch.Tensor:
        """One batch of a CPU-cached chain, on the compute device."""
        return tensor[index].to(self.device, non_blocking=True)

    @torch.no_grad()
    def run(self, hidden: Chain, block: nn.Module | None = None) -> Chain:
        """Run `block` (default: this block in its current state) over all samples of `hidden`, batch by batch, under
        `self.autocast`; the outputs are an fp32 chain from `self.chains`, filled batch by batch (never a list of
        batches concatenated: the new chain would exist twice)."""
        module = self.block if block is None else block
        kwargs = self.device_kwargs()
        out = None
        with autocast(self.autocast, self.device):
            for part in self.batches(hidden.shape[0]):
                rows = self.checked(call_block(module, self.batch(hidden, part), kwargs).to("cpu", torch.float32))
                if out is None:
                    out = self.chains.new((hidden.shape[0], *rows.shape[1:]))
                out[part] = rows
        return self.chains.new(tuple(hidden.shape)) if out is None else out

    def checked(self, out: torch.Tensor) -> torch.Tensor:
        """`out` (a batch of a chain) if every value is finite, else a clear error naming this block."""
        if not torch.isfinite(out).all():
            raise LowbitError(
                f"block {self.index} produced NaN/Inf; the checkpoint may be broken, or a fp16 model overflowed: "
                "load it in float32"
            )
        return out
