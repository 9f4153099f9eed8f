"""TEQ: trainable equivalent per-channel scales, block-wise or on the whole-model loss."""

from lowbit.methods.teq.stage import TEQ

STAGES = (TEQ,)
RECIPES: dict = {}
__all__ = ["RECIPES", "STAGES", "TEQ"]
