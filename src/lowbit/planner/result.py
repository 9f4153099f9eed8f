"""The memory planner's answer (planner/plan.py builds it): named terms per phase, the decision, whether it fits,
the one-line refusal, the run-record dict and the human table of `lowbit plan`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lowbit.errors import LowbitError
from lowbit.planner.shape import ModelShape

MIB = 2**20
GIB = 2**30
RECLAIMABLE = ("checkpoint_pages",)  # file-backed pages the kernel may drop: in the peak RSS, not in the requirement


@dataclass
class MemoryPlan:
    """A run's memory estimate: named terms per phase (bytes), the decision, and whether it fits."""

    shape: ModelShape
    settings: dict[str, Any]
    stream: bool
    phases: dict[str, dict[str, int]]
    baseline: int
    available: int | None = None
    gpu_terms: dict[str, int] = field(default_factory=dict)
    gpu_available: int | None = None
    decision: str = ""
    fixes: list[str] = field(default_factory=list)
    gpu_fixes: list[str] = field(default_factory=list)
    blocked: str | None = None  # why this mode cannot run at all (e.g. a model-scope stage while streaming)
    notes: list[str] = field(default_factory=list)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda name: sum(self.phases[name].values()))

    @property
    def terms(self) -> dict[str, int]:
        """The terms of the peak phase."""
        return self.phases[self.peak_phase]

    @property
    def estimate(self) -> int:
        """Estimated peak RSS in bytes (what VmHWM would show)."""
        return self.baseline + sum(self.terms.values())

    @property
    def required_phase(self) -> str:
        """The phase that needs the most memory that cannot be reclaimed."""
        return max(self.phases, key=lambda name: _unreclaimable(self.phases[name]))

    @property
    def required(self) -> int:
        """Bytes that must be available: the peak without file pages the kernel can reclaim."""
        return self.baseline + _unreclaimable(self.phases[self.required_phase])

    @property
    def gpu_estimate(self) -> int | None:
        return sum(self.gpu_terms.values()) if self.gpu_terms else None

    @property
    def fits(self) -> bool:
        host = self.available is None or self.required <= self.available
        gpu = self.gpu_available is None or not self.gpu_terms or self.gpu_estimate <= self.gpu_available
        return self.blocked is None and host and gpu

    def refusal(self) -> str:
        """One line: the estimate, the memory available and the options that would make it fit (cheapest first)."""
        mode = "streamed" if self.stream else "resident"
        if self.blocked is not None:
            fixes = f"; it fits with: {'; or '.join(self.fixes)}" if self.fixes else ""
            return f"cannot run {mode}: {self.blocked}{fixes}"
        parts = []
        if self.available is not None and self.required > self.available:
            terms = {k: v for k, v in self.phases[self.required_phase].items() if k not in RECLAIMABLE}
            top = ", ".join(f"{k} {gib(v)}" for k, v in sorted(terms.items(), key=lambda kv: -kv[1])[:3])
            why = next((note for note in self.notes if note.startswith("streaming cannot help")), None)
            fixes = f"it fits with: {'; or '.join(self.fixes)}" if self.fixes else (
                "no single option makes it fit (streaming, fewer samples, a shorter seqlen, the chains on disk, a "
                f"smaller batch size){' - ' + why if why else ''}: it needs a machine with more memory"
            )  # fmt: skip
            parts.append(
                f"this {mode} run needs about {gib(self.required)} of RAM at its peak ({self.required_phase}: {top}) "
                f"but {gib(self.available)} is available; {fixes}"
            )
        if self.gpu_terms and self.gpu_available is not None and self.gpu_estimate > self.gpu_available:
            fixes = f"it fits with: {'; or '.join(self.gpu_fixes)}" if self.gpu_fixes else (
                "no single option makes it fit (smaller batches, fewer samples, the CPU)"
            )  # fmt: skip
            parts.append(
                f"on {self.settings['device']} it needs about {gib(self.gpu_estimate)} of accelerator memory but "
                f"{gib(self.gpu_available)} is free; {fixes}"
            )
        return " | ".join(parts) if parts else f"this {mode} run fits ({gib(self.required)} of {gib(self.available)})"

    def check(self) -> MemoryPlan:
        """Raise the refusal as a LowbitError when the run cannot fit; return the plan otherwise."""
        if not self.fits:
            raise LowbitError(self.refusal())
        return self

    def to_dict(self) -> dict[str, Any]:
        """For the run record: terms in MiB (as record.peak_rss_mb), estimate, available and the decision."""
        return {
            "mode": "stream" if self.stream else "resident",
            "decision": self.decision,
            "peak_phase": self.peak_phase,
            "estimate_mib": _mib(self.estimate),
            "required_mib": _mib(self.required),
            "available_mib": None if self.available is None else _mib(self.available),
            "fits": self.fits,
            "baseline_mib": _mib(self.baseline),
            "terms_mib": {k: _mib(v) for k, v in self.terms.items()},
            "phases_mib": {p: _mib(self.baseline + sum(t.values())) for p, t in self.phases.items()},
            "gpu": None
            if not self.gpu_terms
            else {
                "estimate_mib": _mib(self.gpu_estimate),
                "available_mib": None if self.gpu_available is None else _mib(self.gpu_available),
                "terms_mib": {k: _mib(v) for k, v in self.gpu_terms.items()},
            },
            "fixes": self.fixes + self.gpu_fixes,
            "notes": self.notes,
            "settings": self.settings,
            "model": self.shape.to_dict(),
        }

    def describe(self) -> str:
        """A human table for `lowbit plan`: every phase, the peak phase's terms, the decision."""
        s, shape = self.settings, self.shape
        lines = [
            f"model: {shape.model_type}, {shape.params / 1e9:.2f} B params ({shape.num_layers} blocks, largest "
            f"{shape.largest_block.params / 1e6:.1f} M), stored {shape.dtype}",
            f"run: {s['recipe']} {s['scheme']}, {s['nsamples']} x {s['seqlen']} tokens, batch {s['batch_size']}, "
            f"device {s['device']}, export {s['export_format']}{', chains on disk' if s.get('chains_on_disk') else ''}",
            f"mode: {'stream' if self.stream else 'resident'} ({self.decision})" if self.decision else "",
            "",
            f"{'phase':<14}{'peak RSS':>12}",
        ]
        for name, terms in self.phases.items():
            mark = "  <- peak" if name == self.peak_phase else ""
            lines.append(f"{name:<14}{gib(self.baseline + sum(terms.values())):>12}{mark}")
        lines += ["", f"terms of {self.peak_phase}:", f"  {'runtime_baseline':<28}{gib(self.baseline):>12}"]
        lines += [f"  {k:<28}{gib(v):>12}" for k, v in sorted(self.terms.items(), key=lambda kv: -kv[1])]
        available = "unknown" if self.available is None else gib(self.available)
        lines.append(f"estimate {gib(self.estimate)} (needs {gib(self.required)}), available {available}")
        if self.gpu_terms:
            lines += ["", f"accelerator ({s['device']}):"]
            lines += [f"  {k:<28}{gib(v):>12}" for k, v in sorted(self.gpu_terms.items(), key=lambda kv: -kv[1])]
            free = "unknown" if self.gpu_available is None else gib(self.gpu_available)
            lines.append(f"estimate {gib(self.gpu_estimate)}, free {free}")
        lines.append("fits" if self.fits else f"does not fit: {self.refusal()}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(line for line in lines if line is not None)


def _unreclaimable(terms: dict[str, int]) -> int:
    return sum(v for k, v in terms.items() if k not in RECLAIMABLE)


def gib(value: int | None) -> str:
    if value is None:
        return "?"
    return f"{value / GIB:.1f} GiB" if value >= GIB else f"{value / MIB:.0f} MiB"


def _mib(value: int) -> float:
    return round(value / MIB, 1)
