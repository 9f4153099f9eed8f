"""Freeze a module's own parameters while a method trains its extra tensors, then restore the flags."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Gradients then flow only into the method's tensors: no weight .grad is filled, no weight dW is computed."""
    saved = {name: param.requires_grad for name, param in module.named_parameters()}
    module.requires_grad_(False)
    try:
        yield
    finally:
        for name, param in module.named_parameters():
            param.requires_grad_(saved[name])
