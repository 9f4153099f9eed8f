"""AWQ: activation-aware per-channel scaling of each scale group, then optional clip search."""

from lowbit.methods.awq.stage import AWQ, RECIPES

STAGES = (AWQ,)
__all__ = ["AWQ", "RECIPES", "STAGES"]
