"""QuantizedModel: the result of a run, evaluable as fake-quant and exportable."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
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
from lowbit.export.gguf import GGUF_FORMAT, PreparedGguf, check_gguf_scheme, prepare_gguf
from lowbit.export.gguf.checks import check_gguf_records
from lowbit.export.gguf.streamed import GgufStreamedExport
from lowbit.export.packed import PreparedExport
from lowbit.export.shards import DEFAULT_MAX_SHARD_SIZE, ShardWriter, parse_max_shard_size
from lowbit.export.space import estimate_export_bytes
from lowbit.export.streamed import StreamedExport
from lowbit.export.validate import check_act_format
from lowbit.formats.files import RECORD_FILE
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
    streamed: bool = False  # the blocks went to the export as they finished (the model's blocks are meta)
    outside: dict[str, QuantizedWeight] = field(default_factory=dict)  # a GGUF scheme's embedding/output records

    def perplexity(
        self, dataset: str | None = "auto", *, seqlen: int = 2048, max_windows: int | None = None
    ) -> PerplexityResult:
        """Fake-quant perplexity on `dataset` (docs/methods.md), with the scheme's activation quantization."""
        data = load_eval(self.tokenizer, dataset)
        with activation_quant(self.model, arch_for(self.model), self.config.scheme.act_bits):
            return perplexity(self.model, data.input_ids, seqlen=seqlen, max_windows=max_windows)

    def _prepare(
        self, fmt: str, target: str, tp: int, ct_packing: str | None, packer: str, streamed: bool = False
    ) -> PreparedExport | PreparedGguf | None:
        """Validate `fmt` for this result (everything but the write); None for `fake`, which needs no packing."""
        check_act_format(fmt, self.config.scheme)
        check_gguf_scheme(fmt, self.config.scheme)
        if fmt == GGUF_FORMAT:
            if streamed:
                raise LowbitError("GGUF export of a streamed run is not supported yet: use --opt engine.stream=off")
            return prepare_gguf(self.model, self.weights, self.tokenizer, self.config.scheme, self.outside)
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
            streamed=streamed,
        )

    def _choose(
        self, format: str, target: str, tp: int, ct_packing: str | None, packer: str, streamed: bool = False
    ) -> tuple[str, PreparedExport | PreparedGguf | None, dict[str, Any]]:
        """The format to write (auto: the first of AUTO_ORDER that validates), its prepared export, the record."""
        if format not in (AUTO_FORMAT, *FORMATS):
            raise LowbitError(f"unknown format '{format}'; available: {AUTO_FORMAT}, {', '.join(FORMATS)}")
        candidates = AUTO_ORDER if format == AUTO_FORMAT else (format,)
        rejected: dict[str, str] = {}
        for fmt in candidates:
            try:
                prepared = self._prepare(fmt, target, tp, ct_packing or ("dense" if format == AUTO_FORMAT else None),
                                         packer, streamed)  # fmt: skip
                break
            except LowbitError as error:
                if format != AUTO_FORMAT:
                    raise
                rejected[fmt] = str(error)
        if rejected:
            log.info("format auto -> %s (%s)", fmt, "; ".join(f"not {k}: {v}" for k, v in rejected.items()))
        record = {**self.record, "format": fmt}
        if rejected:
            record["format_choice"] = {"chosen": fmt, "rejected": rejected}
        if prepared is not None:
            record["export"] = {"target": target, "tp": tp, "ct_packing": ct_packing, "warnings": prepared.warnings}
        if isinstance(prepared, PreparedGguf):
            record["export"]["gguf_tensor_types"] = prepared.tensor_types()  # which GGUF type each tensor got
        return fmt, prepared, record

    def _write(
        self,
        directory: Path,
        out: str | Path,
        fmt: str,
        prepared: PreparedExport | PreparedGguf | None,
        record: dict[str, Any],
        max_shard_bytes: int,
        writer: ShardWriter | None = None,
    ) -> None:
        if prepared is None:
            write_fake(directory, self.model, self.tokenizer, record, max_shard_size=max_shard_bytes, writer=writer)
        else:
            prepared.write(directory, self.tokenizer, record, max_shard_size=max_shard_bytes, writer=writer)
        write_artifacts(directory, self.artifacts)
        if "mixed_precision" in record:  # the editable plan an `auto:` run chose (`--scheme-plan` reruns it)
            from lowbit.mixed.plan import PLAN_FILE, PLAN_KEYS

            plan = {k: record["mixed_precision"][k] for k in PLAN_KEYS if k in record["mixed_precision"]}
            (directory / PLAN_FILE).write_text(yaml.safe_dump(plan, sort_keys=False))
        write_card(directory, out, fmt, record)
        self.record["format"] = fmt

    def finish_streamed(
        self,
        sink: StreamedExport | GgufStreamedExport,
        out: str | Path,
        *,
        target: str = "any",
        tp: int = 1,
        ct_packing: str | None = None,
        packer: str = "lowbit",
    ) -> None:
        """Complete the export a streamed run wrote block by block into `sink.directory` (the caller's atomic
        output directory): validate the whole (records without codes), then write what lies outside the blocks,
        the config, tokenizer, run record and model card."""
        if isinstance(sink, GgufStreamedExport):
            self._finish_streamed_gguf(sink, out)
            return
        fmt, prepared, record = self._choose(sink.fmt, target, tp, ct_packing, packer, streamed=True)
        self._write(sink.directory, out, fmt, prepared, record, sink.writer.max_shard_bytes, writer=sink.writer)

    def _finish_streamed_gguf(self, sink: GgufStreamedExport, out: str | Path) -> None:
        """The streamed GGUF file is complete but for what follows the blocks; then the run record and the card."""
        check_gguf_records(self.weights)
        types = sink.finish(self.model)
        record = {**self.record, "format": GGUF_FORMAT, "export": {"target": "any", "warnings": [],
                                                                   "gguf_tensor_types": types}}  # fmt: skip
        (sink.directory / RECORD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
        write_artifacts(sink.directory, self.artifacts)
        write_card(sink.directory, out, GGUF_FORMAT, record)
        self.record["format"] = GGUF_FORMAT

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
        if self.streamed:
            raise LowbitError(
                "this result comes from a streamed run: its blocks were written to its export as they finished and "
                "are no longer in memory; stream with lowbit.quantize_to(out, ...) (or `lowbit quantize --out`)"
            )
        max_shard_bytes = parse_max_shard_size(max_shard_size)
        format, prepared, record = self._choose(format, target, tp, ct_packing, packer)
        needed = estimate_export_bytes(self.model, self.config.scheme, format)
        with atomic_output_dir(out, overwrite, needed_bytes=needed) as temp:
            self._write(temp, out, format, prepared, record, max_shard_bytes)
        log.info("wrote %s export to %s", format, out)
        if self.work is not None:
            self.work.remove()
            self.work = None
        return Path(out)
