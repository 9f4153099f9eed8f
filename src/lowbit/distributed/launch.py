"""Starting ranks: join the group torchrun describes, or start N ranks of this command through torch's launcher.

torchrun passes each worker its place as RANK / WORLD_SIZE / LOCAL_RANK (with MASTER_ADDR / MASTER_PORT): that is
the launcher's protocol, read here and nowhere else; nothing of lowbit's own is configured through the environment.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from lowbit.distributed.group import Group
from lowbit.distributed.ranks import RankFailed
from lowbit.errors import LowbitError

log = logging.getLogger(__name__)


def launched_world_size() -> int:
    """How many ranks the launcher started this process among (1: not started by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_devices(ranks_per_machine: int, device: str) -> None:
    """One GPU per rank with engine.device=cuda: refuse more ranks on a machine than it has GPUs."""
    if not device.startswith("cuda"):
        return
    count = torch.cuda.device_count()
    if ranks_per_machine > count:
        raise LowbitError(
            f"{ranks_per_machine} ranks with engine.device=cuda need as many GPUs, this machine has {count}: "
            f"start at most {count} ranks per machine (or compute on the CPU: engine.device=cpu)"
        )


def init_group(timeout_s: float, *, device: str = "cpu") -> Group:
    """This process's `Group`: the single process outside torchrun, else a joined process group (NCCL when this
    rank computes on CUDA, `device` being engine.device; gloo otherwise) whose collectives time out after
    `timeout_s`."""
    world = launched_world_size()
    if world <= 1:
        return Group(timeout_s=timeout_s)
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    cuda = device.startswith("cuda")
    check_devices(int(os.environ.get("LOCAL_WORLD_SIZE", world)), device)
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local_rank)  # engine.device=cuda then means this rank's GPU
    group = Group(rank=rank, world_size=world, local_rank=local_rank, backend=backend, timeout_s=timeout_s)
    dist.init_process_group(backend, timeout=group.timeout)
    return group


def relaunch(argv: Sequence[str], nproc: int, log_dir: Path) -> int:
    """Run `python -m lowbit ARGV` as `nproc` ranks on this machine through torch.distributed.run (torchrun's own
    code: standalone rendezvous on a free port, one thread per rank unless OMP_NUM_THREADS says otherwise, no
    restarts). Rank 0 reports a failure on the console; where rank 0 itself died without a word (a signal), the
    error raised here names the rank. Returns the exit status for the shell."""
    if nproc < 1:
        raise LowbitError(f"--nproc must be at least 1, got {nproc}")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "-m", "lowbit"])
    args.training_script_args = list(argv)  # never parsed as the launcher's own (abbreviated) options
    quiet = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.distributed.run")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:  # the ranks report; the launcher's own banners and failure tables would repeat them
        logger.setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as error:
        codes = {rank: failure.exitcode for rank, failure in error.failures.items()}
        log.debug("ranks failed: %s", codes)
        if codes.get(0, 0) > 0:
            return codes[0]  # rank 0 printed its line
        rank = min(codes, key=lambda r: (codes[r] >= 0, r))  # a rank ended by a signal first
        how = f"signal {-codes[rank]}" if codes[rank] < 0 else f"exit status {codes[rank]}"
        raise RankFailed(f"rank {rank} ended with {how} (the ranks' logs: {log_dir})") from None
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
    return 0
