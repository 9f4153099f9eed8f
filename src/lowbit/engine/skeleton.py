"""A model whose decoder blocks stay on disk until the block loop reaches them (streaming, read side).

`open_streamed` builds the model on the meta device with accelerate's `init_empty_weights` (buffers stay real,
so non-persistent buffers such as rotary `inv_freq` or Gemma's `embed_scale` are computed by the model's own
constructor, as transformers computes them), reads every tensor outside the decoder blocks (embeddings, final
norm, lm_head, OPT's learned positions) and ties lm_head to the embeddings itself: `tie_weights()` on meta tensors
is unsafe in transformers 5. Each block is then read with `materialize_block(i)` and dropped back to meta with
`release_block(i)`, so memory holds the non-block tensors plus the blocks in flight.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from lowbit.arch import arch_for
from lowbit.engine.checkpoint import CheckpointReader
from lowbit.engine.keymap import KeyMap
from lowbit.errors import LowbitError
from lowbit.safeload import check_config, read_config

logger = logging.getLogger(__name__)
Shape = tuple[int, ...]

# families whose checkpoint layout is known to load exactly (tests/test_stream_load.py checks each one)
STREAMABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "opt", "qwen3_moe")


def persistent_tensors(module: nn.Module, prefix: str = "") -> list[tuple[str, Tensor]]:
    """Parameters and persistent buffers of `module` (what a checkpoint holds), each shared tensor once."""
    out: list[tuple[str, Tensor]] = list(module.named_parameters(prefix=prefix.rstrip(".")))
    for mod_name, mod in module.named_modules(prefix=prefix.rstrip(".")):
        for name, buffer in mod._buffers.items():
            if buffer is not None and name not in mod._non_persistent_buffers_set:
                out.append((f"{mod_name}.{name}" if mod_name else name, buffer))
    return out


def meta_tensors(module: nn.Module) -> list[str]:
    """Names of the parameters and buffers of `module` that are still on the meta device."""
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return [name for name, tensor in named if tensor.is_meta]


def tied_output_name(model: nn.Module) -> str | None:
    """lm_head's weight name when the config ties it to the input embeddings (it then has no checkpoint key)."""
    output = model.get_output_embeddings()
    if output is None or not getattr(model.config, "tie_word_embeddings", False):
        return None
    return next(f"{name}.weight" for name, module in model.named_modules() if module is output)


def set_tensor(root: nn.Module, name: str, value: Tensor) -> None:
    """Replace the parameter or buffer `name` of `root` by `value` (a Parameter keeps its requires_grad)."""
    module_name, _, leaf = name.rpartition(".")
    module = root.get_submodule(module_name)
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[leaf] = value


class StreamedModel:
    """The meta skeleton of a checkpoint's model, with its non-block tensors real and its blocks read on demand."""

    def __init__(self, path: Path, *, dtype: torch.dtype = torch.float32) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.path, self.dtype = path, dtype
        check_config(path, read_config(path), trust_remote_code=False)
        self.config = AutoConfig.from_pretrained(path)
        model_type = self.config.model_type
        if model_type not in STREAMABLE_MODEL_TYPES:
            raise LowbitError(
                f"streaming does not support model type '{model_type}' yet (supported: "
                f"{', '.join(STREAMABLE_MODEL_TYPES)}); load the model resident instead"
            )
        self.arch = arch_for(self.config)
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        self.model.eval()
        self._load_generation_config()
        self.reader = CheckpointReader(path, base_model_prefix=self.model.base_model_prefix)
        self.keymap = KeyMap(self.arch)
        self.blocks = self.arch.blocks(self.model)
        self._shapes = {name: tuple(t.shape) for name, t in persistent_tensors(self.model)}
        self._block_names = [
            [name for name, _ in persistent_tensors(block, self.arch.block_name(i))]
            for i, block in enumerate(self.blocks)
        ]
        self.tied_name = tied_output_name(self.model)
        in_blocks = {name for names in self._block_names for name in names}
        self._outside = [n for n in self._shapes if n not in in_blocks and n != self.tied_name]
        self._load(self.model, {name: self._shapes[name] for name in self._outside})
        if self.tied_name is not None:
            self._tie()
        left = [n for n in meta_tensors(self.model) if not n.startswith(f"{self.arch.blocks_path}.")]
        if left:
            raise LowbitError(f"after reading the non-block tensors of '{path}', {', '.join(left[:5])} are still meta")
        self.source_dtype = self._source_dtype()
        logger.info(
            "streaming %s (%s, %d blocks) from %s: stored %s, computing in %s",
            type(self.model).__name__, self.arch.family, len(self.blocks), path, self.source_dtype, dtype,
        )  # fmt: skip

    def _load_generation_config(self) -> None:
        """The generation config `from_pretrained` would load (generation_config.json, else config.json's generation
        keys), so a streamed model's export writes the same generation_config.json as a resident one."""
        if not self.model.can_generate():
            return
        from transformers import GenerationConfig

        try:
            self.model.generation_config = GenerationConfig.from_pretrained(self.path, local_files_only=True)
        except OSError:
            self.model.generation_config = GenerationConfig.from_pretrained(
                self.path, config_file_name="config.json", _from_model_config=True, local_files_only=True
            )

    @property
    def num_blocks(self) -> int:
        """The number of decoder blocks."""
        return len(self.blocks)

    def _tie(self) -> None:
        embedding = self.model.get_input_embeddings().weight
        self.model.get_output_embeddings().weight = embedding
        if self.model.get_output_embeddings().weight is not self.model.get_input_embeddings().weight:
            raise LowbitError(f"could not tie {self.tied_name} to the input embeddings of '{self.path}'")

    def _source_dtype(self) -> torch.dtype:
        sizes = {dtype: size for dtype, size in self.reader.bytes_by_dtype().items() if dtype.is_floating_point}
        return max(sizes, key=sizes.__getitem__) if sizes else self.dtype

    def _sources(self, shapes: dict[str, Shape]) -> dict[str, list[str]]:
        return {name: [key for key, _ in self.keymap.sources(name, shape)] for name, shape in shapes.items()}

    def _load(self, root: nn.Module, shapes: dict[str, Shape], prefix: str = "") -> None:
        """Read the model tensors `shapes` names (full names; `root` is the module at `prefix`), set them at dtype."""
        sources = self._sources(shapes)
        values = self.reader.read([key for keys in sources.values() for key in keys], dtype=self.dtype)
        for name, keys in sources.items():
            value = self.keymap.assemble(name, shapes[name], {key: values.pop(key) for key in keys})
            if tuple(value.shape) != shapes[name]:
                raise LowbitError(
                    f"tensor '{name}' in '{self.path}' has shape {tuple(value.shape)} but config.json gives "
                    f"{shapes[name]}: the checkpoint does not belong to this config"
                )
            set_tensor(root, name[len(prefix) :], value)

    def block_keys(self, index: int) -> list[str]:
        """The checkpoint keys of block `index`, named as save_pretrained of this model names them."""
        shapes = {name: self._shapes[name] for name in self._block_names[index]}
        return [key for keys in self._sources(shapes).values() for key in keys]

    def non_block_keys(self) -> list[str]:
        """The checkpoint keys outside the decoder blocks (tied lm_head excluded: it has none)."""
        shapes = {name: self._shapes[name] for name in self._outside}
        return [key for keys in self._sources(shapes).values() for key in keys]

    def materialize_block(self, index: int) -> nn.Module:
        """Read block `index` from the checkpoint at `dtype` (only its meta tensors; a no-op when resident)."""
        block, prefix = self.blocks[index], f"{self.arch.block_name(index)}."
        shapes = {prefix + name: tuple(t.shape) for name, t in persistent_tensors(block) if t.is_meta}
        if shapes:
            self._load(block, shapes, prefix)
        left = meta_tensors(block)
        if left:
            raise LowbitError(
                f"block {index} of '{self.path}' still has meta tensors after reading it ({', '.join(left[:5])}): "
                "they have no checkpoint key this loader knows; streaming cannot run this model"
            )
        for name, tensor in block.named_parameters(prefix=prefix.rstrip(".")):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise LowbitError(
                    f"weight '{name}' of the model at '{self.path}' contains NaN or Inf, so the checkpoint is "
                    "damaged: repair or re-download the checkpoint"
                )
        return block

    def release_block(self, index: int) -> None:
        """Put block `index`'s parameters and persistent buffers back on meta (non-persistent buffers stay)."""
        block = self.blocks[index]
        for name, tensor in persistent_tensors(block):
            if not tensor.is_meta:
                set_tensor(block, name, torch.empty(tensor.shape, dtype=tensor.dtype, device="meta"))

    def is_materialized(self, index: int) -> bool:
        """Whether block `index` holds real tensors only."""
        return not meta_tensors(self.blocks[index])

    @contextmanager
    def materialized(self, index: int) -> Iterator[nn.Module]:
        """Block `index` read for the duration of the `with` and released after it."""
        try:
            yield self.materialize_block(index)
        finally:
            self.release_block(index)

    def read_block_stored(self, index: int, keys: list[str] | None = None) -> dict[str, Tensor]:
        """Block `index`'s checkpoint tensors as stored (at-rest dtype, checkpoint names): the float remainder an
        export copies without a round trip through the compute dtype."""
        return self.reader.read(self.block_keys(index) if keys is None else keys)


def open_streamed(model: str | Path | None, *, dtype: torch.dtype = torch.float32) -> StreamedModel:
    """Open a safetensors checkpoint (directory, hub id, or None for the embedded default) for block streaming."""
    from lowbit.models import resolve_model_path

    return StreamedModel(resolve_model_path(None if model is None else str(model)), dtype=dtype)
