"""SignRound: signed-gradient tuning of rounding offsets and clip ranges, block by block."""

from lowbit.methods.signround.stage import RECIPES, SignRound

STAGES = (SignRound,)
__all__ = ["RECIPES", "STAGES", "SignRound"]
