"""QuantizedModel: the result of a run, evaluable as fake-quant and exportable."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lowbit.actquant import ActQuantHandle, activation_quant
from lowbit.arch import arch_for
from lowbit.config import QuantizeConfig
from lowbit.data import load_eval
from lowbit.engine.workdir import WorkDir
from lowbit.errors import LowbitError
from lowbit.eval.perplexity import PerplexityResult, perplexity
from lowbit.export import FORMATS, PACKED_FORMATS, atomic_output_dir, prepare_packed, write_artifacts, write_fake
from lowbit.export.space import estimate_export_bytes
from lowbit.export.validate import check_act_format
from lowbit.quantizer import QuantizedWeight

log = logging.getLogger(__name__)


@dataclass
class QuantizedModel:
    """A model whose block linears hold their dequantized (fake-quant) weights, plus the integer records.

    `weights` maps each quantized linear's full module name to its codes/scale/zero record; exports are built
    from these records, never re-derived from floats. `artifacts` holds what stages kept for reuse (AWQ's
    scales and clips); every export writes them to `lowbit_artifacts.safetensors`. `work` is the checkpoint
    directory of a run that had one; the first successful `save` removes it. For a weight-activation scheme
    `act_quant` holds the activation quantizers installed on `model` (`act_quant.remove()` gives the weight-only
    twin; `perplexity` applies them again regardless).
    """

    model: nn.Module
    tokenizer: Any
    weights: dict[str, QuantizedWeight]
    config: QuantizeConfig
    record: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Tensor] = field(default_factory=dict)
    act_quant: ActQuantHandle | None = None
    work: WorkDir | None = None  # the run's checkpoints, removed once an export is written

    def perplexity(
        self, dataset: str | None = "auto", *, seqlen: int = 2048, max_windows: int | None = None
    ) -> PerplexityResult:
        """Fake-quant perplexity on `dataset` (specs/evaluation.md §1), with the scheme's activation quantization."""
        data = load_eval(self.tokenizer, dataset)
        with activation_quant(self.model, arch_for(self.model), self.config.scheme.act_bits):
            return perplexity(self.model, data.input_ids, seqlen=seqlen, max_windows=max_windows)

    def save(
        self,
        out: str | Path,
        *,
        format: str = "fake",
        overwrite: bool = False,
        target: str = "any",
        tp: int = 1,
        ct_packing: str | None = None,
        packer: str = "lowbit",
    ) -> Path:
        """Write the export; the directory appears only once complete.

        Packed formats ("compressed-tensors", "gptq") are validated against `target` (vllm-gpu, vllm-cpu,
        transformers, any) and tensor-parallel degree `tp` before anything is written (specs/formats.md §5).
        `ct_packing` ("dense" | "legacy") selects the compressed-tensors layout for 3/5/6/7-bit weights.
        """
        if format not in FORMATS:
            raise LowbitError(f"unknown format '{format}'; available: {', '.join(FORMATS)}")
        check_act_format(format, self.config.scheme)
        record = {**self.record, "format": format}
        prepared = None
        if format in PACKED_FORMATS:
            prepared = prepare_packed(
                self.model,
                self.weights,
                format,
                target=target,
                tp=tp,
                ct_packing=ct_packing,
                packer=packer,
                run_record=self.record,
                act_bits=self.config.scheme.act_bits,
            )
            record["export"] = {"target": target, "tp": tp, "ct_packing": ct_packing, "warnings": prepared.warnings}
        needed = estimate_export_bytes(self.model, self.config.scheme, format)
        with atomic_output_dir(out, overwrite, needed_bytes=needed) as temp:
            if prepared is None:
                write_fake(temp, self.model, self.tokenizer, record)
            else:
                prepared.write(temp, self.tokenizer, record)
            write_artifacts(temp, self.artifacts)
        log.info("wrote %s export to %s", format, out)
        if self.work is not None:
            self.work.remove()
            self.work = None
        return Path(out)
