"""lowbit: post-training quantization of large language models."""

from lowbit.api import quantize, quantize_to
from lowbit.errors import LowbitError
from lowbit.result import QuantizedModel
from lowbit.runtime.load import load
from lowbit.scheme import QuantScheme, parse_scheme
from lowbit.version import __version__

__all__ = [
    "LowbitError",
    "QuantScheme",
    "QuantizedModel",
    "__version__",
    "load",
    "parse_scheme",
    "quantize",
    "quantize_to",
]
