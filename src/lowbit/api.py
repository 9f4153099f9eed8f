"""The Python API: `lowbit.quantize(...)` returns a QuantizedModel; `lowbit.quantize_to(out, ...)` also writes the
export, with the same fail-fast checks as `lowbit quantize` (both are `lowbit.run`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lowbit.config import build_config
from lowbit.models import LoadedModel, load_model
from lowbit.quantization import run_quantization
from lowbit.result import QuantizedModel
from lowbit.run import ExportSettings, quantize_to
from lowbit.run_eval import EvalSettings
from lowbit.scheme import QuantScheme

__all__ = ["EvalSettings", "ExportSettings", "quantize", "quantize_to"]

log = logging.getLogger(__name__)


def quantize(
    model: str | LoadedModel | None = None,
    *,
    recipe: str | None = None,
    scheme: str | QuantScheme | Mapping[str, Any] | None = None,
    dataset: str | None = None,
    nsamples: int | None = None,
    seqlen: int | None = None,
    seed: int | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    recipe_file: str | Path | None = None,
    scheme_plan: str | Path | None = None,
    work_dir: str | Path | None = None,
    resume: bool = False,
) -> QuantizedModel:
    """Quantize `model` (HF id, local directory, an already loaded model, or None for the embedded default).

    `options` maps a stage name (or "engine") to its options, e.g. {"engine": {"batch_size": 4}}; the same
    names as `--opt` on the command line. A LoadedModel passed in is quantized in place. With `work_dir`, every
    finished block and model stage is checkpointed there, `resume=True` continues an interrupted run from it,
    and `QuantizedModel.save` removes it once the export is written.
    """
    config = build_config(
        recipe=recipe,
        scheme=scheme,
        dataset=dataset,
        nsamples=nsamples,
        seqlen=seqlen,
        seed=seed,
        options=options,
        recipe_file=recipe_file,
        scheme_plan=scheme_plan,
    )
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    return run_quantization(loaded, config, work_dir=work_dir, resume=resume)
