"""Print the markdown tables of benchmarks/RESULTS.md's OmniQuant and DESV sections from the JSON results.

python benchmarks/table_omniquant.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FILES = ("omniquant_weight", "omniquant_cpu", "omniquant_cpu2", "omniquant_wa", "omniquant_desv")


def _ppl(value: float) -> str:
    return f"{value:,.0f}" if value >= 1000 else f"{value:.2f}"


def table(rows: list[dict], reference: dict[str, float]) -> str:
    lines = [
        "| scheme | method | ppl | vs RTN | quantize s | s/block | train ms/step (block 0) | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        detail = row.get("detail_block0") or {}
        step = detail.get("step_ms") or (detail.get("desv") or {}).get("step_ms") or "-"
        base = reference.get(row["scheme"])
        ratio = f"{row['ppl'] / base:.3g}x" if base else "-"
        lines.append(
            f"| {row['scheme']} | {row['label']} | {_ppl(row['ppl'])} | {ratio} | {row['quantize_seconds']:.0f} | "
            f"{row['block_seconds_mean']:.2f} | {step} | {row['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    loaded = {
        name: json.loads((RESULTS / f"{name}.json").read_text())
        for name in FILES
        if (RESULTS / f"{name}.json").exists()
    }
    rtn = {row["scheme"]: row["ppl"] for data in loaded.values() for row in data["rows"] if row["recipe"] == "rtn"}
    for name, data in loaded.items():
        print(f"### {name} (settings {data['settings']})\n")
        print(table(data["rows"], rtn))
        print()


if __name__ == "__main__":
    main()
