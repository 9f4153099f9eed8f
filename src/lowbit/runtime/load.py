"""`lowbit.load(DIR)`: read a compressed-tensors or GPTQ v1 checkpoint into a model that runs on CPU packed.

The model skeleton is built without allocating its parameters (accelerate's `init_empty_weights`); each quantized
linear is replaced by a `PackedLinear` built from its checkpoint tensors, one layer at a time, and the float
remainder is assigned as loaded. Peak memory is therefore close to the packed checkpoint, not the float model.
`kernel="auto"` (the default) moves each layer that qualifies onto torch's int4/int8 CPU matmul kernel as it is
built (within the tolerance runtime.py states); `kernel="reference"` keeps every layer on the bit-exact path.
A directory without a packed `quantization_config` (a float model or a `fake` export) loads as usual.

A lowbit export of a weight-activation scheme (its run record names the activation bits) is returned with its
activation quantizers installed (`lowbit.actquant`), so it is never evaluated weight-only by accident.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from lowbit.arch import arch_for
from lowbit.errors import LowbitError
from lowbit.formats.files import ARTIFACTS_FILE, LOWBIT_KEY, RECORD_FILE
from lowbit.formats.packing import packed_words, unpack_codes
from lowbit.models import LoadedModel
from lowbit.runtime.kernels import Kernel, check_kernel, log_paths
from lowbit.runtime.packed_linear import PackedLinear

log = logging.getLogger(__name__)

PACKED_METHODS = ("compressed-tensors", "gptq")


def packed_method(directory: str | Path) -> str | None:
    """The packed format of a checkpoint directory ("compressed-tensors" | "gptq"), or None."""
    config = Path(directory) / "config.json"
    if not config.is_file():
        return None
    qc = json.loads(config.read_text()).get("quantization_config") or {}
    method = qc.get("quant_method")
    return method if method in PACKED_METHODS else None


def _tensor_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files; the stages' artifacts (AWQ scales, OmniQuant state) are not model tensors."""
    files = sorted(p for p in directory.glob("*.safetensors") if p.name != ARTIFACTS_FILE)
    if not files:
        raise LowbitError(f"no .safetensors files in {directory}: pass a directory written by a packed export")
    return files


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


class _Reader:
    """Reads one safetensors tensor at a time with plain file reads, never mapping the file.

    safetensors' own `safe_open` maps the file, and the mapped pages count in the process's resident memory on
    top of the copies; reading into fresh tensors keeps the peak at the size of the loaded model.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        self.start, self.header = 8 + size, header

    def keys(self) -> list[str]:
        return list(self.header)

    def get_tensor(self, key: str) -> Tensor:
        info = self.header[key]
        begin, end = info["data_offsets"]
        out = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
        with self.path.open("rb") as f:
            f.seek(self.start + begin)
            f.readinto(memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else bytearray(0))
        assert end - begin == out.numel() * out.element_size()
        return out


def _read_all(directory: Path) -> dict[str, Any]:
    """Lazy readers: name -> reader of its file; tensors are read one at a time."""
    handles = {}
    for path in _tensor_files(directory):
        reader = _Reader(path) if sys.byteorder == "little" else safe_open(str(path), framework="pt")
        for key in reader.keys():  # noqa: SIM118 - safe_open has no __iter__
            handles[key] = reader
    return handles


def _ct_scheme(qc: dict[str, Any], name: str) -> dict[str, Any]:
    for group in qc.get("config_groups", {}).values():
        for target in group.get("targets", []):
            if target == "Linear" or (target.startswith("re:") and re.match(target[3:], name)):
                return group["weights"]
    raise LowbitError(f"{name} has packed weights but no config group targets it: the checkpoint is inconsistent")


def _ct_layer(qc: dict[str, Any], name: str, get) -> PackedLinear:
    args = _ct_scheme(qc, name)
    bits = int(args["num_bits"])
    if args.get("type", "int") != "int":
        raise LowbitError(f"{name}: only integer pack-quantized weights load on lowbit's runtime")
    m, k = (int(v) for v in get(f"{name}.weight_shape").tolist())
    packed, scale = get(f"{name}.weight_packed"), get(f"{name}.weight_scale")
    group_size = -1 if args.get("strategy") == "channel" else int(args["group_size"])
    meta = qc.get(LOWBIT_KEY) or {}
    packing = meta.get("ct_packing") or "dense"
    if packed.shape[1] != packed_words(k, bits, packing):
        packing = "legacy" if packed.shape[1] == packed_words(k, bits, "legacy") else packing
    codes = unpack_codes(packed, bits, k, packing)
    if args.get("symmetric", True):
        zero = torch.full(scale.shape, 2 ** (bits - 1), dtype=torch.uint8)
    else:
        zero = unpack_codes(get(f"{name}.weight_zero_point").T.contiguous(), bits, m, packing).T
    g_idx = get(f"{name}.weight_g_idx", None)
    return _packed(codes, scale, zero, bits, group_size, get(f"{name}.bias", None), g_idx)


def _ct_int8_layer(qc: dict[str, Any], name: str, get) -> PackedLinear:
    """A W8A8 `int-quantized` linear: int8 weight (signed code, symmetric) and a per-channel scale."""
    args = _ct_scheme(qc, name)
    if int(args["num_bits"]) != 8 or args.get("strategy") != "channel" or not args.get("symmetric", True):
        raise LowbitError(f"{name}: lowbit reads int-quantized only as 8-bit symmetric per-channel weights")
    weight, scale = get(f"{name}.weight"), get(f"{name}.weight_scale")
    codes = (weight.to(torch.int16) + 128).to(torch.uint8)
    zero = torch.full(scale.shape, 128, dtype=torch.uint8)
    return _packed(codes, scale, zero, 8, -1, get(f"{name}.bias", None), None)


def _gptq_layer(qc: dict[str, Any], name: str, get) -> PackedLinear:
    bits, group_size = int(qc["bits"]), int(qc["group_size"])
    if bits not in (2, 4, 8):
        raise LowbitError(f"{bits}-bit GPTQ uses a cross-word layout lowbit does not read: use compressed-tensors")
    qweight, qzeros, scales = get(f"{name}.qweight"), get(f"{name}.qzeros"), get(f"{name}.scales")
    m, k = int(qweight.shape[1]), int(qweight.shape[0]) * 32 // bits
    codes = unpack_codes(qweight.T.contiguous(), bits, k, "legacy")
    offset = 0 if qc.get("checkpoint_format") == "gptq_v2" else 1  # v1 stores zero - 1
    zero = (unpack_codes(qzeros, bits, m, "legacy").to(torch.int32) + offset).T
    if int(zero.max()) >= 2**bits:
        raise LowbitError(f"{name}: a stored GPTQ zero overflows {bits} bits; the checkpoint cannot be decoded")
    g_idx = get(f"{name}.g_idx", None)
    if g_idx is not None:
        trivial = torch.arange(k, dtype=g_idx.dtype) // (k if group_size == -1 else group_size)
        g_idx = None if torch.equal(g_idx, trivial) else g_idx
    return _packed(codes, scales.T.contiguous(), zero, bits, group_size, get(f"{name}.bias", None), g_idx)


def _packed(codes, scale, zero, bits, group_size, bias, g_idx) -> PackedLinear:
    from lowbit.formats.packing import pack_codes

    k = int(codes.shape[1])
    return PackedLinear(pack_codes(codes, bits), scale, zero, bits, group_size, k, bias, g_idx)


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc only).

    Unpacking and repacking each layer makes short-lived tensors of a few MiB; glibc serves them from a heap that
    fragments, and without a trim the process keeps ~2x the packed model resident after loading.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _skeleton(directory: Path) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
    with contextlib.suppress(LowbitError):  # MoE: per-expert linears to receive the checkpoint's per-expert layers
        arch_for(model).prepare(model)
    return model.eval()


def load_packed(directory: str | Path, *, kernel: Kernel = "auto") -> nn.Module:
    """The model of a compressed-tensors or GPTQ v1 checkpoint with PackedLinear layers (CPU, eval mode).

    `kernel`: "auto" runs each layer that qualifies on torch's int4/int8 CPU kernel, "reference" none.
    """
    check_kernel(kernel)
    path = Path(directory)
    method = packed_method(path)
    if method is None:
        raise LowbitError(f"{path} holds no compressed-tensors or GPTQ quantization_config: load it as a float model")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    ct_format = qc.get("format")
    if method == "compressed-tensors" and ct_format not in ("pack-quantized", "int-quantized"):
        raise LowbitError(
            f"compressed-tensors format {ct_format!r} is not supported: only pack-quantized and int-quantized (W8A8)"
        )
    handles = _read_all(path)

    def get(key: str, *default: Any) -> Tensor | None:
        if key not in handles:
            if default:
                return default[0]
            raise LowbitError(f"checkpoint tensor {key} is missing: the export is incomplete")
        return handles[key].get_tensor(key)

    int8 = method == "compressed-tensors" and ct_format == "int-quantized"
    marker = ".weight_scale" if int8 else ".weight_packed" if method == "compressed-tensors" else ".qweight"
    layers = sorted(key[: -len(marker)] for key in handles if key.endswith(marker))
    model = _skeleton(path)
    build = _ct_int8_layer if int8 else _ct_layer if method == "compressed-tensors" else _gptq_layer
    consumed = set()
    for index, name in enumerate(layers):
        layer = build(qc, name, get)
        layer.use_kernel(kernel)  # before the next layer is read: one packed copy per layer at a time
        model.set_submodule(name, layer)
        if index % 8 == 7:
            _trim_heap()
        consumed.update(key for key in handles if key.startswith(f"{name}."))
    remainder = {key: get(key) for key in handles if key not in consumed}
    missing, unexpected = model.load_state_dict(remainder, strict=False, assign=True)
    if unexpected:
        raise LowbitError(f"checkpoint tensors {unexpected[:3]} fit no module: the export does not match its config")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    del remainder
    _trim_heap()
    meta = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise LowbitError(f"checkpoint has no values for {meta[:3]}: the export is incomplete")
    log.info("loaded %s checkpoint %s with %d packed linears", method, path, len(layers))
    log_paths(model, kernel)
    return model


def export_act_bits(directory: str | Path) -> int:
    """The activation bits a lowbit export was quantized and measured with (16: weight-only), from its run record."""
    path = Path(directory)
    record_file = path / RECORD_FILE
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        activation = record.get("activation")
        if activation:
            return int(activation["bits"])
        return int(((record.get("config") or {}).get("scheme") or {}).get("act_bits", 16))
    config = path / "config.json"
    if config.is_file():
        qc = json.loads(config.read_text()).get("quantization_config") or {}
        activation = (qc.get(LOWBIT_KEY) or {}).get("activation")
        if activation:
            return int(activation["bits"])
    return 16


def _with_act_quant(loaded: LoadedModel, path: Path) -> LoadedModel:
    """Install the export's activation quantizers (W-A schemes), as lowbit measured it."""
    from lowbit.actquant import install_activation_quant
    from lowbit.arch import arch_for

    bits = export_act_bits(path)
    if bits < 16:
        install_activation_quant(loaded.model, arch_for(loaded.model), bits)
        log.info("%s: %d-bit per-token asymmetric activation quantization installed (run record)", path, bits)
    return loaded


def load(
    directory: str | Path,
    *,
    kernel: Kernel = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load an export (packed formats on lowbit's CPU runtime) or any float model directory, with its tokenizer.

    A W-A export comes back with its activation quantization installed. `kernel` picks the packed runtime's
    matmul: "auto" (torch's int4/int8 CPU kernels where a layer qualifies; fast, within runtime.py's tolerance)
    or "reference" (dequantize per forward; bit for bit the fake-quant model); float models ignore it.
    `allow_pickle` and `trust_remote_code` accept the risks `load_model` refuses by default (pickle weights, code
    shipped with the model).
    """
    from transformers import AutoTokenizer

    from lowbit.models import load_model

    check_kernel(kernel)
    path = Path(directory).expanduser()
    if packed_method(path) is None:
        loaded = load_model(str(path), allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        return _with_act_quant(loaded, path) if path.is_dir() else loaded
    model = load_packed(path, kernel=kernel)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return _with_act_quant(LoadedModel(model, tokenizer, str(directory), path), path)
