"""Data-parallel runs on torch.distributed: each rank holds a contiguous slice of the calibration samples and the
stages reduce what they sum over samples, in a fixed order, so N ranks write what one process writes.

World size 1 never touches torch.distributed: `Group()` is the single process and every reduction is the identity.
"""

from lowbit.distributed.group import Group, local_indices, shard_bounds
from lowbit.distributed.launch import check_devices, init_group, launched_world_size, relaunch

__all__ = ["Group", "check_devices", "init_group", "launched_world_size", "local_indices", "relaunch", "shard_bounds"]
