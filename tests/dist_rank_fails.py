"""`lowbit` with rank 1 raising in GPTQ's second block: what tests/test_distributed.py runs under torchrun."""

import sys

from lowbit.cli import main
from lowbit.methods.gptq.stage import GPTQ

_original = GPTQ.process_block


def _failing(self: GPTQ, ctx) -> None:
    if ctx.group.rank == 1 and ctx.index == 1:
        raise RuntimeError("injected failure on rank 1")
    _original(self, ctx)


GPTQ.process_block = _failing
sys.exit(main(sys.argv[1:]))
