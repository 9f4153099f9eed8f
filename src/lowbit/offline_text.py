"""Text every machine already has, so calibration and perplexity need no network and no committed prose.

Two sources of different domains:
- "builtin": the documentation topics CPython ships (`pydoc_data`): technical prose about Python.
- "licenses": the license texts Debian and Ubuntu install in /usr/share/common-licenses (GPL, LGPL, Apache,
  MPL, GFDL, Artistic, CC0, BSD...): English legal prose, a second domain to check that a method's perplexity
  gain is not tied to the text it was calibrated on.

Each is split deterministically by document into calibration and evaluation text that never overlap.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import re
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError

logger = logging.getLogger(__name__)

EVAL_EVERY = 4  # every 4th document (builtin) or license family (licenses) in sorted order is evaluation text
LICENSES_DIR = Path("/usr/share/common-licenses")

# --- builtin: CPython's pydoc topics ----------------------------------------------------------------


def builtin_split() -> tuple[list[str], list[str]]:
    """(calibration, evaluation) topics: every 4th topic in sorted-key order is evaluation."""
    topics = _pydoc_topics()
    keys = sorted(topics)
    calibration = [topics[k] for i, k in enumerate(keys) if i % EVAL_EVERY != 0]
    evaluation = [topics[k] for i, k in enumerate(keys) if i % EVAL_EVERY == 0]
    return calibration, evaluation


def _pydoc_topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError as e:
        raise LowbitError(
            "the builtin dataset needs CPython's pydoc_data module, which this Python lacks; "
            "pass a local .txt/.jsonl/.json file or install lowbit[hub] for hub datasets"
        ) from e
    return dict(topics)


def builtin_meta(role: str, n_documents: int) -> dict:
    """What the run record says about the builtin text of `role`."""
    return {
        "name": "builtin",
        "source": f"pydoc_data.topics (CPython {platform.python_version()})",
        "split": "evaluation = every 4th topic in sorted-key order (index % 4 == 0), calibration = the rest",
        "role": role,
        "n_documents": n_documents,
    }


# --- licenses: /usr/share/common-licenses ------------------------------------------------------------


@dataclass(frozen=True)
class LicenseText:
    """One distinct license file: its name in the directory, its family (name without version) and content."""

    name: str
    family: str
    sha256: str
    text: str


def license_family(name: str) -> str:
    """'GPL-2' -> 'GPL', 'LGPL-2.1' -> 'LGPL', 'CC0-1.0' -> 'CC0', 'BSD' -> 'BSD'.

    Versions of one license share most of their wording, so the split keeps a family on one side."""
    return re.sub(r"-\d+(\.\d+)*$", "", name)


def license_texts(directory: Path | None = None) -> tuple[list[LicenseText], dict[str, str]]:
    """The distinct license texts of `directory` sorted by file name, and the links skipped as duplicates.

    Regular files are read first, then symbolic links (read through once); a file whose bytes were already read
    (GPL -> GPL-3) is skipped, so each text appears once and under its versioned name.
    """
    root = LICENSES_DIR if directory is None else directory
    if not root.is_dir():
        raise LowbitError(
            f"the licenses dataset reads the license texts Debian and Ubuntu install in {root}, which this machine "
            "lacks; use 'builtin' or a local .txt/.jsonl/.json file instead"
        )
    entries = sorted(root.iterdir(), key=lambda path: (path.is_symlink(), path.name))
    seen: dict[str, str] = {}  # sha256 -> name first read with it
    texts, duplicates = [], {}
    for path in entries:
        if not path.is_file():  # subdirectories, dangling links
            continue
        try:
            content = path.read_bytes()
        except OSError as error:  # unreadable: the meta lists only what was read
            logger.warning("licenses: skipping %s (%s)", path, error)
            continue
        digest = hashlib.sha256(content).hexdigest()
        if digest in seen:
            duplicates[path.name] = seen[digest]
            continue
        seen[digest] = path.name
        text = content.decode("utf-8", errors="replace").strip()
        if text:
            texts.append(LicenseText(path.name, license_family(path.name), digest, text))
    texts.sort(key=lambda item: item.name)
    return texts, duplicates


def licenses_split(directory: Path | None = None) -> tuple[list[LicenseText], list[LicenseText], dict[str, str]]:
    """(calibration, evaluation, duplicates): every 4th license family in sorted order is evaluation text."""
    texts, duplicates = license_texts(directory)
    families = sorted({item.family for item in texts})
    if len(families) < 2:
        root = LICENSES_DIR if directory is None else directory
        raise LowbitError(
            f"the licenses dataset found {len(families)} license famil{'y' if len(families) == 1 else 'ies'} in "
            f"{root}, too few to split into calibration and evaluation text; use 'builtin' or a local file instead"
        )
    evaluation_families = set(families[::EVAL_EVERY])
    calibration = [item for item in texts if item.family not in evaluation_families]
    evaluation = [item for item in texts if item.family in evaluation_families]
    return calibration, evaluation, duplicates


def licenses_documents(role: str) -> tuple[list[str], dict]:
    """The documents of one role ("calibration" or "eval") and the meta naming every file and its sha256."""
    calibration, evaluation, duplicates = licenses_split()
    chosen = calibration if role == "calibration" else evaluation
    meta = {
        "name": "licenses",
        "source": str(LICENSES_DIR),
        "split": (
            "license families (file name without its version) in sorted order: every 4th (index % 4 == 0) is "
            "evaluation, the rest calibration; one document per distinct file, in file-name order"
        ),
        "role": role,
        "n_documents": len(chosen),
        "files": {item.name: item.sha256 for item in chosen},
        "families": sorted({item.family for item in chosen}),
        "duplicates_skipped": duplicates,
        "chars": sum(len(item.text) for item in chosen),
    }
    logger.debug("licenses %s text: %s", role, ", ".join(meta["files"]))
    return [item.text for item in chosen], meta
