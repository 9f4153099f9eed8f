"""Evaluation: perplexity here; lm-eval tasks (`lmeval`), comparison tables (`compare`), run reports (`report`)."""

from lowbit.eval.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
