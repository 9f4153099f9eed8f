"""HQQ: half-quadratic quantization, a data-free lp-norm fit of each group's scale and zero (Badri & Shaji 2023)."""

from lowbit.methods.hqq.stage import HQQ

STAGES = (HQQ,)
RECIPES: dict = {}
__all__ = ["HQQ", "RECIPES", "STAGES"]
