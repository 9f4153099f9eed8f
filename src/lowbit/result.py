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
from lowbit.export import (
    AUTO_FORMAT,
    AUTO_ORDER,
    FORMATS,
    PACKED_FORMATS,
    atomic_output_dir,
    prepare_packed,
    write_artifacts,
    write_fake,
)
from lowbit.export.card import write_card
from lowbit.export.packed import PreparedExport
from lowbit.export.shards import DEFAULT_MAX_SHARD_SIZE, parse_max_shard_size
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
    report_path: Path | None = None  # the run report written into the export (`quantize_to(..., report=True)`)

    def perplexity(
        self, dataset: str | None = "auto", *, seqlen: int = 2048, max_windows: int | None = None
    ) -> PerplexityResult:
        """Fake-quant perplexity on `dataset` (docs/methods.md), with the scheme's activation quantization."""
        data = load_eval(self.tokenizer, dataset)
        with activation_quant(self.model, arch_for(self.model), self.config.scheme.act_bits):
            return perplexity(self.model, data.input_ids, seqlen=seqlen, max_windows=max_windows)

    def _prepare(self, fmt: str, target: str, tp: int, ct_packing: str | None, packer: str) -> PreparedExport | None:
        """Validate `fmt` for this result (everything but the write); None for `fake`, which needs no packing."""
        check_act_format(fmt, self.config.scheme)
        if fmt not in PACKED_FORMATS:
            return None
        return prepare_packed(
            self.model,
            self.weights,
            fmt,
            target=target,
            tp=tp,
            ct_packing=ct_packing,
            packer=packer,
            run_record=self.record,
            act_bits=self.config.scheme.act_bits,
        )

    def save(
        self,
        out: str | Path,
        *,
        format: str = "auto",
        overwrite: bool = False,
        target: str = "any",
        tp: int = 1,
        ct_packing: str | None = None,
        packer: str = "lowbit",
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    ) -> Path:
        """Write the export (with its model card, README.md); the directory appears only once complete.

        `format="auto"` writes the best format this run can be loaded from: compressed-tensors (vLLM and
        transformers), else GPTQ, else `fake`, whichever first passes validation for `target`; the choice and the
        reasons are logged and kept in the run record. Packed formats ("compressed-tensors", "gptq") are validated
        against `target` (vllm-gpu, vllm-cpu, transformers, any) and tensor-parallel degree `tp` before anything is
        written (docs/formats.md). `ct_packing` ("dense" | "legacy") selects the compressed-tensors layout for
        3/5/6/7-bit weights. The chosen format is `self.record["format"]` afterwards. Weights larger than
        `max_shard_size` (bytes, or "500MB" / "5GB" with GB = 10^9 as in transformers) are split into
        `model-0000k-of-0000n.safetensors` shards at decoder-block boundaries with `model.safetensors.index.json`;
        an export that fits one shard is a single `model.safetensors`.
        """
        if format not in (AUTO_FORMAT, *FORMATS):
            raise LowbitError(f"unknown format '{format}'; available: {AUTO_FORMAT}, {', '.join(FORMATS)}")
        max_shard_bytes = parse_max_shard_size(max_shard_size)
        candidates = AUTO_ORDER if format == AUTO_FORMAT else (format,)
        rejected: dict[str, str] = {}
        for fmt in candidates:
            try:
                prepared = self._prepare(fmt, target, tp, ct_packing or ("dense" if format == AUTO_FORMAT else None),
                                         packer)  # fmt: skip
                break
            except LowbitError as error:
                if format != AUTO_FORMAT:
                    raise
                rejected[fmt] = str(error)
        format = fmt
        if rejected:
            log.info("format auto -> %s (%s)", format, "; ".join(f"not {k}: {v}" for k, v in rejected.items()))
        record = {**self.record, "format": format}
        if rejected:
            record["format_choice"] = {"chosen": format, "rejected": rejected}
        if prepared is not None:
            record["export"] = {"target": target, "tp": tp, "ct_packing": ct_packing, "warnings": prepared.warnings}
        needed = estimate_export_bytes(self.model, self.config.scheme, format)
        with atomic_output_dir(out, overwrite, needed_bytes=needed) as temp:
            if prepared is None:
                write_fake(temp, self.model, self.tokenizer, record, max_shard_size=max_shard_bytes)
            else:
                prepared.write(temp, self.tokenizer, record, max_shard_size=max_shard_bytes)
            write_artifacts(temp, self.artifacts)
            write_card(temp, out, format, record)
        self.record["format"] = format
        log.info("wrote %s export to %s", format, out)
        if self.work is not None:
            self.work.remove()
            self.work = None
        return Path(out)
