"""OmniQuant: learnable weight clipping (LWC) and learnable equivalent transformation (LET)."""

from lowbit.methods.omniquant.stage import LET, RECIPES, OmniQuant

STAGES = (OmniQuant, LET)
__all__ = ["LET", "RECIPES", "STAGES", "OmniQuant"]
