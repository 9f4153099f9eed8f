"""`lowbit` with rank 1 failing in GPTQ's second block (`raise`: an exception; `hang`: it stops answering; `kill`:
it dies by SIGKILL), what tests/test_distributed.py runs under torchrun: `dist_rank_fails.py MODE quantize ...`."""

import os
import signal
import sys
import time

from lowbit.cli import main
from lowbit.methods.gptq.stage import GPTQ

_original = GPTQ.process_block
_mode = sys.argv.pop(1)


def _failing(self: GPTQ, ctx) -> None:
    if ctx.group.rank == 1 and ctx.index == 1:
        if _mode == "hang":
            time.sleep(120)
        if _mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("injected failure on rank 1")
    _original(self, ctx)


GPTQ.process_block = _failing
sys.exit(main(sys.argv[1:]))
