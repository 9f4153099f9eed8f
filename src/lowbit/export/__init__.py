"""Writing a QuantizedModel: fake (dequantized float), compressed-tensors, GPTQ and GGUF, validated per target.

Reading an export back is `lowbit.runtime`; file names and the bit packing both sides use are `lowbit.formats`.
"""

from lowbit.export.artifacts import read_artifacts, write_artifacts
from lowbit.export.atomic import atomic_output_dir, check_output_dir
from lowbit.export.fake import write_fake
from lowbit.export.gguf import GGUF_FORMAT
from lowbit.export.packed import PACKED_FORMATS, prepare_packed
from lowbit.export.validate import TARGETS

FORMATS = ("fake", *PACKED_FORMATS, GGUF_FORMAT)
AUTO_FORMAT = "auto"  # the best of AUTO_ORDER that validates for the run: what `lowbit quantize --out` writes
AUTO_ORDER = ("compressed-tensors", "gptq", "fake")  # never gguf: it needs a gguf:<type> scheme chosen on purpose

__all__ = [
    "AUTO_FORMAT",
    "AUTO_ORDER",
    "FORMATS",
    "GGUF_FORMAT",
    "PACKED_FORMATS",
    "TARGETS",
    "atomic_output_dir",
    "check_output_dir",
    "prepare_packed",
    "read_artifacts",
    "write_artifacts",
    "write_fake",
]
