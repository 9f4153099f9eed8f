"""LSI/DESV: OmniQuant plus a banded, trainable increment of the dequantization scales."""

from lowbit.methods.desv.stage import DESV, RECIPES

STAGES = (DESV,)
__all__ = ["DESV", "RECIPES", "STAGES"]
