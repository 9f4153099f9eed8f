"""Which precision and which compiler a forward runs with: the one place that decides.

Precedence for a tuning stage's `autocast` option (SignRound, TEQ, AWQ, GPTQ, OmniQuant, DESV):
1. an explicit per-stage value (`--opt signround.autocast=off`) wins;
2. else `--opt engine.dtype=fp32|bf16` fills every stage option left at "auto" (`with_engine_dtype`, when the
   configuration is built, so the run record and the resume fingerprint hold the resolved value);
3. else "auto" resolves on the device (`resolve_autocast`): the stage's measured `autocast_default` ("bf16" only
   where the device computes bf16 natively), or OmniQuant's AMP rule when the stage passes its bit width.
The engine's own replays (float targets, quantized chain) follow the tuning stages when they all agree, unless
`engine.replay=fp32` (`replay_autocast`). `engine.compile` is resolved by `resolve_compile`: `on` checks for the
compiler before any data loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import shutil
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from lowbit.errors import LowbitError

AUTOCAST_MODES = ("off", "bf16", "fp16")
TuneAutocast = Literal["auto", "off", "bf16"]  # the `autocast` option of SignRound, TEQ and AWQ
Forward = Callable[[dict[str, Tensor], Tensor], Tensor]

# `--opt engine.dtype`: the training precision of every stage whose `autocast` option is left at "auto".
EngineDtype = Literal["auto", "fp32", "bf16"]
DTYPE_AUTOCAST = {"fp32": "off", "bf16": "bf16"}


def with_engine_dtype(options: Any, dtype: str) -> Any:
    """A stage's options with `autocast` set from engine.dtype when the stage left it at "auto" (else unchanged)."""
    mode = DTYPE_AUTOCAST.get(dtype)
    if mode is None or getattr(options, "autocast", None) != "auto":
        return options
    return dataclasses.replace(options, autocast=mode)


def replay_autocast(stages: Iterable[Any], replay: str, device: torch.device) -> str:
    """The autocast of the engine's replays: the one every data stage asks for (`replay_autocast`), else off;
    always off with `engine.replay=fp32`."""
    if replay == "fp32":
        return "off"
    modes = {stage.replay_autocast(device) for stage in stages if stage.needs_data}
    return modes.pop() if len(modes) == 1 else "off"


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matmuls natively (a CUDA GPU with bf16; a CPU with AVX512-BF16 or AMX): only
    there is bf16 autocast faster than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's feature probes
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def resolve_autocast(mode: str, device: torch.device, bits: int | None = None, default: str = "off") -> str:
    """The training precision `mode` stands for on `device`. 'auto': with `bits`, OmniQuant's AMP (fp16 on CUDA
    below 8 bits, as its reference; off elsewhere); without, the stage's measured `default` ("bf16" only where
    `native_bf16`, else off). `--opt engine.dtype` has already replaced 'auto' when the user set it."""
    if mode != "auto":
        return mode
    if bits is not None:
        return "fp16" if device.type == "cuda" and bits < 8 else "off"
    return "bf16" if default == "bf16" and native_bf16(device) else "off"


def autocast_dtype(mode: str) -> torch.dtype:
    """The compute dtype of an autocast mode ("off": fp32)."""
    return {"off": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def autocast(mode: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Reduced-precision autocast for the block forward/backward; parameters, targets and the loss stay fp32."""
    if mode == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=autocast_dtype(mode))


def autocast_forward(forward: Forward, mode: str, device: torch.device) -> Forward:
    """`forward` under `autocast(mode)`, its output cast back to fp32 so the loss against the fp32 targets is an
    fp32 loss; with mode 'off' `forward` itself (bit-identical to plain fp32 training)."""
    if mode == "off":
        return forward

    def run(weights: dict[str, Tensor], hidden: Tensor) -> Tensor:
        with autocast(mode, device):
            out = forward(weights, hidden)
        return out.float()

    return run


def compiler_missing(device: torch.device) -> str | None:
    """What torch.compile's inductor backend lacks on `device` (a C++ compiler on CPU, triton on a GPU), else
    None: checked before the long work starts."""
    if device.type == "cpu" and not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        return "a C++ compiler (g++ or clang++)"
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "triton"
    return None


def resolve_compile(mode: str, device: torch.device) -> bool:
    """Whether the tuning stages' block forward is compiled: `on` (an error when the compiler is missing), `off`,
    or `auto`: off (compiling is measured in benchmarks/results/speed-log.md; not yet the default)."""
    if mode == "on" and (missing := compiler_missing(device)) is not None:
        raise LowbitError(f"engine.compile=on needs {missing} for torch.compile on {device.type}: install it, or "
                          "set --opt engine.compile=off")  # fmt: skip
    return mode == "on"
