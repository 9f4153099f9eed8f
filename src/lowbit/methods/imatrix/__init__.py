"""imatrix RTN: llama.cpp's importance-weighted scale search on any lowbit grid (docs/methods.md)."""

from lowbit.methods.imatrix.stage import IMatrixRTN

STAGES = (IMatrixRTN,)
RECIPES: dict = {}
