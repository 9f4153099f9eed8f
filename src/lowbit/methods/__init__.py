"""Every stage lowbit offers, by name. A new method is one file here plus one entry in STAGES."""

from lowbit.engine import Stage
from lowbit.methods.awq import AWQ
from lowbit.methods.awq import RECIPES as AWQ_RECIPES
from lowbit.methods.desv import DESV
from lowbit.methods.desv import RECIPES as DESV_RECIPES
from lowbit.methods.gptq import GPTQ
from lowbit.methods.invarexplore import InvarExplore
from lowbit.methods.omniquant import LET, OmniQuant
from lowbit.methods.omniquant import RECIPES as OMNIQUANT_RECIPES
from lowbit.methods.rtn import RTN
from lowbit.methods.signround import RECIPES as SIGNROUND_RECIPES
from lowbit.methods.signround import SignRound
from lowbit.methods.teq import TEQ
from lowbit.presets import RecipePreset

STAGES: dict[str, type[Stage]] = {
    stage.name: stage for stage in (RTN, SignRound, GPTQ, TEQ, AWQ, OmniQuant, DESV, LET, InvarExplore)
}

# Named presets (`--recipe signround-fast`): a stage plus option overrides and calibration size.
RECIPE_PRESETS: dict[str, RecipePreset] = {**SIGNROUND_RECIPES, **AWQ_RECIPES, **OMNIQUANT_RECIPES, **DESV_RECIPES}

__all__ = ["RECIPE_PRESETS", "STAGES"]
