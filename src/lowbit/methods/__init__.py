"""Every stage lowbit offers, by name. A new method is one folder here plus one entry in METHODS."""

from types import ModuleType

from lowbit.engine import Stage
from lowbit.methods import awq, desv, gptq, hqq, imatrix, invarexplore, omniquant, rtn, signround, teq
from lowbit.presets import RecipePreset

# The order is the order `lowbit recipes` lists them in.
METHODS: tuple[ModuleType, ...] = (rtn, imatrix, signround, gptq, teq, awq, omniquant, desv, invarexplore, hqq)

STAGES: dict[str, type[Stage]] = {stage.name: stage for method in METHODS for stage in method.STAGES}

# Named presets (`--recipe signround-fast`): a stage plus option overrides and calibration size.
RECIPE_PRESETS: dict[str, RecipePreset] = {
    name: preset for method in METHODS for name, preset in method.RECIPES.items()
}

__all__ = ["METHODS", "RECIPE_PRESETS", "STAGES"]
