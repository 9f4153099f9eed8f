"""Markdown tables for benchmarks/RESULTS.md from one or more bench_gptq_awq.py JSON files.

Usage: python benchmarks/table_gptq_awq.py benchmarks/results/gptq_awq_w*.json
A later file's row replaces an earlier one with the same (tool, method, scheme).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PEER_METHOD = {"awq+rtn": "awq"}  # lowbit's recipe name -> llmcompressor's row name


def merged_rows(paths: list[Path]) -> dict[tuple[str, str, str], dict]:
    rows: dict[tuple[str, str, str], dict] = {}
    for path in paths:
        for row in json.loads(path.read_text())["rows"]:
            rows[(row["tool"], row["method"], row["scheme"])] = row
    return rows


def cell(row: dict | None, key: str) -> str:
    if row is None:
        return "-"
    return str(row.get(key, row.get("error", "-")))


def side_table(rows: dict) -> list[str]:
    header = "| scheme | method | lowbit ppl | peer ppl | ppl ratio | lowbit s | peer s | time ratio |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for (tool, method, scheme), ours in rows.items():
        peer = rows.get(("llmcompressor", PEER_METHOD.get(method, method), scheme))
        if tool != "lowbit" or peer is None:
            continue
        ppl = f"{ours['ppl'] / peer['ppl']:.3f}" if "ppl" in ours and "ppl" in peer else "-"
        secs = ours.get("quantize_seconds"), peer.get("quantize_seconds")
        time = f"{secs[0] / secs[1]:.2f}" if None not in secs else "-"
        lines.append(f"| {scheme} | {method} | {cell(ours, 'ppl')} | {cell(peer, 'ppl')} | {ppl} | "
                     f"{cell(ours, 'quantize_seconds')} | {cell(peer, 'quantize_seconds')} | {time} |")  # fmt: skip
    return lines


def lowbit_table(rows: dict) -> list[str]:
    lines = ["| scheme | method | perplexity | quantize wall time (s) |", "|---|---|---|---|"]
    for (tool, method, scheme), row in rows.items():
        if tool == "lowbit":
            lines.append(f"| {scheme} | {method} | {cell(row, 'ppl')} | {cell(row, 'quantize_seconds')} |")
    return lines


def main() -> None:
    rows = merged_rows([Path(p) for p in sys.argv[1:]])
    print("\n".join(side_table(rows)) + "\n")
    print("\n".join(lowbit_table(rows)))


if __name__ == "__main__":
    main()
