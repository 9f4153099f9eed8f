"""Exports of a QuantizedModel. Real packed formats (compressed-tensors, GPTQ) come with their own issue."""

from lowbit.export.artifacts import ARTIFACTS_FILE, read_artifacts, write_artifacts
from lowbit.export.atomic import atomic_output_dir, check_output_dir
from lowbit.export.fake import RECORD_FILE, write_fake
from lowbit.export.packed import PACKED_FORMATS, prepare_packed
from lowbit.export.validate import TARGETS

FORMATS = ("fake", *PACKED_FORMATS)
AUTO_FORMAT = "auto"  # the best of AUTO_ORDER that validates for the run: what `lowbit quantize --out` writes
AUTO_ORDER = ("compressed-tensors", "gptq", "fake")

__all__ = [
    "ARTIFACTS_FILE",
    "AUTO_FORMAT",
    "AUTO_ORDER",
    "FORMATS",
    "PACKED_FORMATS",
    "RECORD_FILE",
    "TARGETS",
    "atomic_output_dir",
    "check_output_dir",
    "prepare_packed",
    "read_artifacts",
    "write_artifacts",
    "write_fake",
]
