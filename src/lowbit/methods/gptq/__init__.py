"""GPTQ: column-by-column quantization with Hessian-based error feedback."""

from lowbit.methods.gptq.stage import GPTQ

STAGES = (GPTQ,)
RECIPES: dict = {}
__all__ = ["GPTQ", "RECIPES", "STAGES"]
