"""Dataset loaders for the offline tasks (lm-eval `custom_dataset`): read the jsonl next to this file.

Found relative to this file, not the working directory, so the tasks run from anywhere and with no network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


def _load(name: str) -> Any:
    import datasets

    rows = [json.loads(line) for line in (HERE / name).read_text().splitlines() if line.strip()]
    splits = {}
    for split in ("train", "test"):
        chosen = [{k: v for k, v in row.items() if k != "split"} for row in rows if row["split"] == split]
        splits[split] = datasets.Dataset.from_list(chosen)
    return datasets.DatasetDict(splits)


def lowbit_mc(**_metadata: Any) -> Any:
    return _load("lowbit_mc.jsonl")


def lowbit_yesno(**_metadata: Any) -> Any:
    return _load("lowbit_yesno.jsonl")


def lowbit_cloze(**_metadata: Any) -> Any:
    return _load("lowbit_cloze.jsonl")
