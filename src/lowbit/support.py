"""The support matrix family x stage x export format, generated from the code (each stage's `refuses`), so what
`lowbit archs` prints is what the pipeline enforces."""

from __future__ import annotations

from lowbit.arch import ARCH_SPECS, ArchSpec


def _features(arch: ArchSpec) -> str:
    """The family's structural traits that the stages honour, in a few words."""
    traits = []
    if arch.norm_kind == "one_plus":
        traits.append("(1+w) norms")
    if arch.ffn_post_norm:
        traits.append("sandwich norms")
    if arch.qk_norm:
        traits.append("q/k norm: no q<->k pair")
    if arch.fused:
        traits.append("fused " + "/".join(f.name.rpartition(".")[2] for f in arch.fused))
    traits.append(f"{arch.ffn.activation} FFN")
    if arch.experts:
        traits.append(f"MoE: per-expert linears ({arch.experts.path}.N.*), float router {arch.experts.router}")
    return ", ".join(traits)


def _formats(arch: ArchSpec, formats: tuple[str, ...]) -> dict[str, str]:
    """Every format writes any family's linears as they are; MoE experts in compressed-tensors must be symmetric
    (what vLLM's MoE kernels and transformers' fused-experts decompressor read: export/validate.py)."""
    found = dict.fromkeys(formats, "yes")
    if arch.experts and "compressed-tensors" in found:
        found["compressed-tensors"] = "yes (symmetric experts)"
    if "gguf" in found:
        from lowbit.export.gguf.arch import family_support

        found["gguf"] = family_support(arch.model_types)
    return found


def support_matrix() -> list[dict[str, object]]:
    """One row per family: model types, traits, per stage "yes" or the refusal reason, per export format."""
    from lowbit.export import FORMATS
    from lowbit.methods import STAGES

    rows = []
    for arch in ARCH_SPECS:
        stages = {name: (stage.refuses(arch) or "yes") for name, stage in STAGES.items()}
        rows.append(
            {
                "family": arch.family,
                "model_types": list(arch.model_types),
                "traits": _features(arch),
                "stages": stages,
                "formats": _formats(arch, FORMATS),
            }
        )
    return rows


def matrix_markdown() -> str:
    """The matrix as a Markdown table (README), refusals as footnotes."""
    rows = support_matrix()
    stages = list(rows[0]["stages"]) if rows else []
    formats = list(rows[0]["formats"]) if rows else []
    head = ["family", "model_type", *stages, *(f"export {name}" for name in formats)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes: list[str] = []
    for row in rows:
        cells = [row["family"], ", ".join(row["model_types"])]
        for name in stages:
            value = row["stages"][name]
            if value == "yes":
                cells.append("yes")
            else:
                notes.append(f"{len(notes) + 1}. {row['family']} / {name}: {value}")
                cells.append(f"no ({len(notes)})")
        cells += [row["formats"][name] for name in formats]
        lines.append("| " + " | ".join(cells) + " |")
    traits = [f"- {row['family']}: {row['traits']}" for row in rows]
    return "\n".join([*lines, "", *notes, "", *traits])
