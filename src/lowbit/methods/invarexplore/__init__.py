"""InvarExplore: hill-climbing over permutations, scalings and rotations that leave the float model unchanged."""

from lowbit.methods.invarexplore.stage import InvarExplore

STAGES = (InvarExplore,)
RECIPES: dict = {}
__all__ = ["RECIPES", "STAGES", "InvarExplore"]
