"""Export-time validation against what the target loader accepts (see docs/formats.md).

Runs before anything is written. A problem the target cannot load is a LowbitError naming the fix; a limit of
an engine the user did not target is a warning. Targets:
- `vllm-gpu`: vLLM's WNA16 / GPTQ kernels (asymmetric only at 4 and 8 bits, fused shards share one scheme,
  the group divides every (tensor-parallel) input size).
- `vllm-cpu`: vLLM's CPU WNA16 kernel (4-bit, sizes multiple of 32, even group size).
- `transformers`: transformers + compressed-tensors / gptqmodel on any device.
- `any`: what the format itself can represent; the vllm-gpu limits are reported as warnings.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.layout import ExportPlan, expert_linears
from lowbit.quantizer import QuantizedWeight
from lowbit.scheme import QuantScheme

log = logging.getLogger(__name__)

TARGETS = ("vllm-gpu", "vllm-cpu", "transformers", "any")
GPTQ_BITS = (2, 4, 8)
_MARLIN_GROUPS = (-1, 32, 64, 128)


@dataclass
class Findings:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, fatal: bool, message: str) -> None:
        (self.errors if fatal else self.warnings).append(message)


def is_symmetric(record: QuantizedWeight) -> bool:
    """Whether the format stores no zero point: sym and sym_full (zero 2^(b-1)); sym_omni is asymmetric."""
    return record.scheme.kind in ("sym", "sym_full")


def scheme_key(record: QuantizedWeight) -> tuple:
    """What an engine compares across a fused set: bits, group size, symmetry, strategy, act-order."""
    s = record.scheme
    return (s.bits, s.group_size, is_symmetric(record), "channel" if s.group_size == -1 else "group", has_g_idx(record))


def has_g_idx(record: QuantizedWeight) -> bool:
    """A non-trivial g_idx (act-order without static groups); the trivial floor(i/g) map is not stored."""
    if record.g_idx is None:
        return False
    k = record.shape[1]
    trivial = torch.arange(k, dtype=torch.int32) // record.scheme.group_width(k)
    return not torch.equal(record.g_idx.cpu(), trivial)


SERVED_ACT_WARNING = (
    "W8A8 engines quantize activations per token *symmetrically* (int8, dynamic), while lowbit simulated and "
    "measured asymmetric per-token activations: served accuracy may differ from the reported one"
)


def _w8a8_problem(bits: int, group_size: int, symmetric: bool, what: str) -> str | None:
    """Why these weights cannot be compressed-tensors W8A8 `int-quantized` (docs/formats.md), or None."""
    if bits == 8 and group_size == -1 and symmetric:
        return None
    return (
        f"compressed-tensors W8A8 (int-quantized, what vLLM serves) needs 8-bit symmetric per-channel weights, "
        f"but {what}; re-run with --scheme w8a8 (8-bit sym per channel), or use --format fake"
    )


def check_act_format(fmt: str, scheme: QuantScheme) -> None:
    """Refuse, before any work, a weight-activation scheme the format cannot hold (docs/formats.md).

    Only W8A8 int is served (compressed-tensors `int-quantized`); activations below 8 bits are a simulation for
    accuracy studies and exist only as `fake` exports, which reload with their activation quantization.
    """
    if not scheme.quantizes_activations or fmt == "fake":
        return
    if scheme.act_bits < 8 and fmt in ("compressed-tensors", "gptq"):
        raise LowbitError(
            f"scheme {scheme.name} quantizes activations to {scheme.act_bits} bits, which is a simulation only "
            f"(no serving engine runs {scheme.act_bits}-bit activations), so it cannot be written as {fmt}: use "
            "--format fake (reloads with its activation quantization on)"
        )
    if fmt == "gptq":
        raise LowbitError(
            f"GPTQ checkpoints are weight-only and cannot carry the activation quantization of {scheme.name}: use "
            "--format compressed-tensors (W8A8 int) or --format fake"
        )
    if fmt == "compressed-tensors":
        what = f"{scheme.name} has {scheme.bits}-bit {scheme.kind} weights with group size {scheme.group_size}"
        problem = _w8a8_problem(scheme.bits, scheme.group_size, scheme.kind in ("sym", "sym_full"), what)
        if scheme.act_bits != 8:
            problem = f"compressed-tensors serves only 8-bit activations, not {scheme.act_bits}: use --format fake"
        if problem:
            raise LowbitError(problem)


def _check_w8a8(plan: ExportPlan, findings: Findings) -> None:
    for name, record in plan.records.items():
        s = record.scheme
        what = f"{name} has {s.bits}-bit {s.kind} weights with group size {s.group_size}"
        problem = _w8a8_problem(s.bits, s.group_size, is_symmetric(record), what)
        if problem:
            findings.add(True, problem)
            return
    findings.warnings.append(SERVED_ACT_WARNING)


def _divisor_hint(sizes: set[int]) -> str:
    """Group sizes (>= 16) that divide every input size, plus -1 (per channel)."""
    common = math.gcd(*sizes)
    good = [d for d in range(16, common + 1) if common % d == 0]
    return ", ".join(str(d) for d in good) + (", or " if good else "") + "-1 (per channel)"


def _check_groups(plan: ExportPlan, fatal: bool, tp: int, why: str, findings: Findings) -> None:
    sizes: set[int] = set()
    bad = []
    for name, record in plan.records.items():
        k = record.shape[1]
        k_part = k // tp if name in plan.row_parallel and k % tp == 0 else k
        sizes.update({k, k_part})
        g = record.scheme.group_size
        if g != -1 and k_part % g:
            bad.append((name, g, k_part))
    if bad:
        name, g, k = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        findings.add(
            fatal,
            f"group size {g} does not divide in_features {k} of {name}{more}, which {why}; "
            f"re-run with a group size that divides every layer: {_divisor_hint(sizes)}",
        )


def _check_fused(plan: ExportPlan, fatal: bool, findings: Findings) -> None:
    for members in plan.fused_sets:
        quantized = [name for name in members if name in plan.records]
        if quantized and len(quantized) != len(members):
            left = sorted(set(members) - set(quantized))
            findings.add(
                fatal,
                f"fused set {members} is split: {left} stay in float; vLLM loads them as one layer, so quantize "
                "all of them or none",
            )
            continue
        keys = {name: scheme_key(plan.records[name]) for name in quantized}
        if len(set(keys.values())) > 1:
            detail = ", ".join(f"{n.rsplit('.', 1)[-1]}={plan.records[n].scheme.name}" for n in quantized)
            findings.add(
                fatal,
                f"fused set {members[0].rsplit('.', 1)[0]} mixes schemes ({detail}); vLLM loads them as one layer: "
                "give q/k/v (and gate/up) the same scheme",
            )


def _check_bits(plan: ExportPlan, fmt: str, target: str, ct_packing: str | None, findings: Findings) -> None:
    by_scheme: dict[tuple[int, bool], str] = {}
    for name, record in plan.records.items():
        by_scheme.setdefault((record.scheme.bits, is_symmetric(record)), name)
    for (bits, sym), name in sorted(by_scheme.items()):
        if fmt == "gptq" and bits not in GPTQ_BITS:
            findings.add(True, f"GPTQ v1 cannot hold {bits}-bit weights ({name}); use --format compressed-tensors")
        if fmt == "compressed-tensors" and 32 % bits and ct_packing is None:
            findings.add(
                True,
                f"{bits}-bit compressed-tensors packing differs between versions ({name}): pass --ct-packing dense "
                "(ct_packing='dense'; compressed-tensors >= 0.20, the pinned version) or legacy to match the loader",
            )
        vllm_gpu = target in ("vllm-gpu", "any")
        if vllm_gpu and not sym and bits not in (4, 8):
            findings.add(
                target == "vllm-gpu",
                f"vLLM on GPU supports asymmetric (zero-point) weights only at 4 and 8 bits, not {bits} ({name}); "
                f"re-run with scheme=w{bits}g<group>-sym_full (or -sym)",
            )
        if target == "vllm-gpu" and sym and bits not in (4, 8):
            findings.warnings.append(f"symmetric {bits}-bit loads only in recent vLLM builds (older: 4 and 8 bits)")
        if target == "vllm-cpu" and bits != 4:
            findings.add(True, f"vLLM's CPU kernel runs only 4-bit weights, not {bits} ({name}); re-run with 4 bits")
        if target == "vllm-cpu" and not sym:
            findings.warnings.append("older vLLM CPU builds reject zero points; prefer a symmetric scheme for vllm-cpu")
        if fmt == "gptq" and target in ("vllm-gpu", "any") and not (sym and bits in (4, 8)):
            findings.warnings.append(
                f"vLLM uses the slower gptq kernel (not Marlin) for {bits}-bit {'sym' if sym else 'asym'} GPTQ"
            )


def _check_vllm_cpu(plan: ExportPlan, findings: Findings) -> None:
    for name, record in plan.records.items():
        m, k = record.shape
        g = record.scheme.group_size
        if m % 32 or k % 32:
            findings.add(True, f"vLLM's CPU kernel needs in/out sizes that are multiples of 32; {name} is [{m}, {k}]")
            return
        if g != -1 and g % 2:
            findings.add(True, f"vLLM's CPU kernel needs an even group size, not {g}; re-run with e.g. 32 or 128")
            return


def _check_gptq(plan: ExportPlan, findings: Findings, *, values: bool = True) -> None:
    """Word packing and fp16 scales need only shapes and the scheme; a zero of 0 needs the codes (`values`)."""
    for name, record in plan.records.items():
        bits = record.scheme.bits
        m, k = record.shape
        per_word = 32 // bits if bits in GPTQ_BITS else 1
        if m % per_word or k % per_word:
            findings.add(
                True, f"GPTQ v1 packs {per_word} values per word; {name} is [{m}, {k}]: use compressed-tensors"
            )
            return
        if values and not is_symmetric(record) and int(record.zero.min()) < 1:
            findings.add(
                True,
                f"GPTQ v1 stores zero-1 and cannot hold an asymmetric zero of 0 ({name}); use --format "
                "compressed-tensors (or a symmetric scheme)",
            )
            return
        scale_dtype = record.scheme.torch_scale_dtype  # a valid record's scales are stored in this dtype
        if scale_dtype != torch.float16:
            findings.add(
                True,
                f"GPTQ v1 stores fp16 scales but {name} has {scale_dtype} scales; re-run with "
                "scale_dtype float16 or use --format compressed-tensors",
            )
            return


def _check_ct_experts(plan: ExportPlan, findings: Findings) -> None:
    """MoE experts in compressed-tensors: vLLM's MoE methods assert symmetric weights, and transformers 5.x
    decompresses experts (into its fused 3-D parameters) from weight_packed/scale/shape only, dropping the zero
    point. No third-party loader reads asymmetric experts, so they are refused for every target."""
    experts = [name for name in expert_linears(plan.model) if name in plan.records]
    asym = next((name for name in experts if not is_symmetric(plan.records[name])), None)
    if asym:
        findings.add(
            True,
            f"compressed-tensors MoE experts must be symmetric ({asym} has zero points): vLLM's compressed-tensors "
            "MoE kernels accept only symmetric experts and transformers' fused-experts decompressor drops the zero "
            "point; re-run with a symmetric scheme (e.g. w4g128-sym), or use --format gptq (or fake)",
        )


def _check_ct_g_idx(plan: ExportPlan, findings: Findings) -> None:
    """compressed-tensors 0.20 removed activation-ordered groups (actorder "group" with a stored g_idx): no current
    loader maps a column to its group, so an act-order run without static groups cannot be written there."""
    name = next((name for name, record in plan.records.items() if has_g_idx(record)), None)
    if name:
        findings.add(
            True,
            f"compressed-tensors no longer stores act-order group maps (g_idx, {name}); re-run GPTQ with "
            "--opt gptq.static_groups=true (act-order, groups in column order), or use --format gptq (desc_act)",
        )


def _check_ct_scales(plan: ExportPlan, findings: Findings) -> None:
    for name, record in plan.records.items():
        scale = record.scale
        if scale.dtype != plan.dtype and not torch.equal(scale.to(plan.dtype).to(scale.dtype), scale):
            wanted = str(plan.dtype).removeprefix("torch.")
            findings.add(
                True,
                f"compressed-tensors stores scales in the model dtype {wanted} but {name}'s {scale.dtype} scales "
                f"do not cast exactly; re-run with scale_dtype {wanted}",
            )
            return


def _check_model(plan: ExportPlan, findings: Findings, *, records: bool = True) -> None:
    """No wrapper or runtime-only module, every record valid and folded into its linear (docs/formats.md).

    `records=False` (a streamed run): the blocks are gone, each was checked by `check_block_records` when it
    finished."""
    for name, module in plan.model.named_modules():
        origin = type(module).__module__
        # lowbit.arch modules are structure, not runtime: an MoE block's experts as per-expert nn.Linears (arch/moe.py)
        if not origin.startswith(("torch.nn", "transformers", "lowbit.arch")):
            findings.add(True, f"module {name} is a {type(module).__name__} (runtime-only); fold it before export")
            return
    if records:
        _check_records(plan.model, plan.records, findings)


def _check_records(
    root: nn.Module, records: dict[str, QuantizedWeight], findings: Findings, prefix: str = "", folded: bool = True
) -> None:
    """Valid records on plain linears of their shape; with `folded`, each weight equal to its record."""
    for name, record in records.items():
        module = root.get_submodule(name.removeprefix(prefix))
        try:
            record.validate()
        except ValueError as error:
            findings.add(True, f"{name}: {error}")
            return
        if type(module) is not nn.Linear or tuple(module.weight.shape) != record.shape:
            findings.add(True, f"{name} is not a plain nn.Linear of shape {record.shape}; fold transforms first")
            return
        if folded and not torch.equal(module.weight.detach().cpu(), record.dequantize().to(module.weight.dtype)):
            findings.add(
                True,
                f"{name}'s weight differs from its quantized record: a transform is still pending; fold it first",
            )
            return


def check_block_records(
    block: nn.Module, prefix: str, records: dict[str, QuantizedWeight], fmt: str, dtype: torch.dtype
) -> None:
    """The checks of `validate_export` that read a record's tensors, on one finished block (a streamed run checks
    each block before it is written and released; the whole export is validated on shapes and schemes at the end):
    valid records on plain linears, and what `fmt` needs of their zeros and scales. The weights equal the records
    by construction (the block loop has just written `record.dequantize()` into them, after every stage), so that
    comparison, a second dequantization of every weight, is left out."""
    findings = Findings()
    _check_records(block, records, findings, prefix=f"{prefix}.", folded=False)
    plan = ExportPlan(block, records, [], [], set(), dtype)
    if fmt == "compressed-tensors":
        _check_ct_scales(plan, findings)
    elif fmt == "gptq":
        _check_gptq(plan, findings, values=True)
    report_findings(findings, fmt, "any")


def validate_export(
    plan: ExportPlan,
    fmt: str,
    target: str = "any",
    *,
    tp: int = 1,
    ct_packing: str | None = None,
    act_bits: int = 16,
    streamed: bool = False,
) -> list[str]:
    """Raise LowbitError on the first problem the target cannot load; log and return the warnings.

    `act_bits` < 16 (a W-A run) is exportable only as compressed-tensors W8A8 `int-quantized`. `streamed`: the
    records hold no codes and the blocks are released (their per-record checks ran as each block finished).
    """
    findings = Findings()
    _check_model(plan, findings, records=not streamed)
    check_plan(plan, fmt, target, tp, ct_packing, act_bits, findings, values=not streamed)
    return report_findings(findings, fmt, target)


def check_plan(
    plan: ExportPlan,
    fmt: str,
    target: str,
    tp: int,
    ct_packing: str | None,
    act_bits: int,
    findings: Findings,
    *,
    values: bool,
) -> None:
    """The checks shared by `validate_export` and `preflight_export`; `values` adds those that read the codes."""
    if target not in TARGETS:
        raise LowbitError(f"unknown target {target!r}: use one of {', '.join(TARGETS)}")
    if tp < 1:
        raise LowbitError(f"tensor-parallel degree {tp} is not valid: use 1 or more")
    if not plan.records:
        raise LowbitError(f"no quantized linears to export as {fmt}: run a quantizer, or use --format fake")
    if act_bits < 16:
        some = next(iter(plan.records.values())).scheme
        check_act_format(fmt, QuantScheme(some.bits, some.group_size, some.kind, act_bits=act_bits))
    if act_bits < 16:
        _check_w8a8(plan, findings)  # engines run W8A8 with their int8 kernels, not the WNA16 ones _check_bits knows
    else:
        _check_bits(plan, fmt, target, ct_packing, findings)
    _check_fused(plan, target in ("vllm-gpu", "vllm-cpu"), findings)
    if fmt == "compressed-tensors":
        if values:
            _check_ct_scales(plan, findings)
        _check_ct_experts(plan, findings)
        _check_ct_g_idx(plan, findings)
        _check_groups(plan, True, tp, "compressed-tensors' decompressor and vLLM require", findings)
    else:
        _check_gptq(plan, findings, values=values)
        strict = target != "any"
        why = f"{target} requires" if strict else "vLLM and gptqmodel kernels require"
        _check_groups(plan, strict, tp, why, findings)
    if target == "vllm-cpu" and act_bits >= 16:
        _check_vllm_cpu(plan, findings)


def report_findings(findings: Findings, fmt: str, target: str, *, log_warnings: bool = True) -> list[str]:
    """Raise the first error (counting the rest); log and return the warnings."""
    if findings.errors:
        more = f" ({len(findings.errors) - 1} more problem(s))" if len(findings.errors) > 1 else ""
        raise LowbitError(findings.errors[0] + more)
    warnings = list(dict.fromkeys(findings.warnings))
    for warning in warnings if log_warnings else ():
        log.warning("export %s for %s: %s", fmt, target, warning)
    return warnings
