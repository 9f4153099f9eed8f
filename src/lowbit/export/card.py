"""The model card (README.md) of every export: what it is and the exact code that loads it in each engine.

The loading code differs by format and is easy to get wrong: an asymmetric compressed-tensors checkpoint does not
load through transformers' default `from_pretrained` (packed zero points; upstream llm-compressor #1618/#1704) and
needs `CompressedTensorsConfig(dequantize=True)`; a weight-activation `fake` export only behaves as measured when
its activation quantizers are installed (`lowbit.load`); GPTQ checkpoints need gptqmodel in transformers.

The card never names the path of the machine that wrote it: its snippets load `./<directory name>` (run them from
the folder that holds the export) or, when the caller gives one, a hub id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError
from lowbit.formats.files import CARD_FILE, GGUF_FILE
from lowbit.scheme import QuantScheme


def _is_symmetric(kind: str) -> bool:
    return kind in ("sym", "sym_full")


def transformers_snippet(fmt: str, directory: str, scheme: dict[str, Any]) -> str:
    """Python that loads the export with transformers (and the format's own package) only."""
    if fmt == "gguf":  # transformers dequantizes GGUF to float (gguf-py), for checks rather than speed
        return (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"model = AutoModelForCausalLM.from_pretrained({directory!r}, gguf_file={GGUF_FILE!r})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({directory!r}, gguf_file={GGUF_FILE!r})\n"
        )
    weight_only = scheme.get("act_bits", 16) >= 16
    if fmt == "compressed-tensors" and weight_only and not _is_symmetric(scheme.get("kind", "asym")):
        return (
            "from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig\n\n"
            "# asymmetric (zero-point) weights: transformers' default compressed path cannot build the packed zero\n"
            "# points (llm-compressor #1618/#1704), so decompress them while loading\n"
            f"model = AutoModelForCausalLM.from_pretrained(\n    {directory!r}, "
            "quantization_config=CompressedTensorsConfig(dequantize=True)\n)\n"
            f"tokenizer = AutoTokenizer.from_pretrained({directory!r})\n"
        )
    return (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"model = AutoModelForCausalLM.from_pretrained({directory!r})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({directory!r})\n"
    )


def lowbit_snippet(directory: str, hub_id: str | None = None) -> str:
    """`lowbit.load` reads a local directory: with a hub id the snippet downloads the export first."""
    if hub_id is not None:
        return (
            "from huggingface_hub import snapshot_download\n\nimport lowbit\n\n"
            f"loaded = lowbit.load(snapshot_download({hub_id!r}))  # .model, .tokenizer\n"
        )
    return f"import lowbit\n\nloaded = lowbit.load({directory!r})  # .model, .tokenizer\n"


def vllm_snippet(directory: str) -> str:
    return f'from vllm import LLM\n\nllm = LLM(model={directory!r})\nprint(llm.generate("Hello")[0].outputs[0].text)\n'


def _requirements(fmt: str) -> str:
    return {
        "compressed-tensors": "`pip install transformers compressed-tensors`",
        "gptq": "`pip install transformers optimum gptqmodel` (gptqmodel ships CUDA kernels; on CPU use lowbit below)",
        "fake": "`pip install transformers`",
        "gguf": "`pip install transformers gguf accelerate`",
    }[fmt]


def scheme_name(scheme: dict[str, Any]) -> str:
    """The scheme's short name (`w4g128`, `w4a4`, ...) from the record's scheme fields, which do not hold it."""
    if scheme.get("name"):
        return str(scheme["name"])
    try:
        return QuantScheme.from_dict(scheme).name
    except (LowbitError, TypeError):
        return "unknown scheme"


def relative_path(directory: str | Path) -> str:
    """`./<name>`: the export as seen from the folder that holds it, without the writing machine's path."""
    return f"./{Path(directory).name}"


def model_label(model: str) -> str:
    """A hub id as it is; a local model directory by its name only (the card does not name the writer's paths)."""
    if model.startswith(("/", "~", ".", "\\")) or Path(model).is_absolute():
        return f"`{Path(model).expanduser().name}` (a local model)"
    return model


def model_card(fmt: str, directory: str | Path, record: dict[str, Any], hub_id: str | None = None) -> str:
    """The README.md of an export written to `directory`.

    The snippets load `hub_id` when one is given (the export pushed to the hub), else `./<directory name>`, to be
    run from the folder that holds the export; the directory's full path is never written into the card.
    """
    name = Path(directory).name
    source = hub_id if hub_id is not None else relative_path(directory)
    config = record.get("config", {})
    scheme = config.get("scheme", {})
    act_bits = scheme.get("act_bits", 16)
    recipe = config.get("recipe", "unknown recipe")
    model = model_label(str(record["model"])) if record.get("model") else "A model"
    lines = [
        f"# {name}",
        "",
        f"{model} quantized by lowbit {record.get('versions', {}).get('lowbit', '')}: "
        f"recipe `{recipe}`, scheme `{scheme_name(scheme)}`, format `{fmt}`.",
        "",
    ]
    if hub_id is None:
        lines += [
            f"The code below loads `{source}`: run it from the folder that holds `{name}`, or change the path.",
            "",
        ]
    if fmt == "fake":
        lines += [
            "This is a `fake` export: the weights are the dequantized float values (for research and evaluation); "
            "it is as large as the float model.",
            "",
        ]
    if act_bits < 16 and fmt == "fake":
        lines += [
            f"The scheme quantizes activations to {act_bits} bits: only `lowbit.load` (or `lowbit eval`) installs "
            "the activation quantizers; plain transformers runs it weight-only.",
            "",
        ]
    if fmt == "gguf":
        lines += [
            "## llama.cpp, Ollama, LM Studio",
            "",
            f"`{GGUF_FILE}` is a GGUF file whose every quantized tensor decodes to exactly the weights lowbit tuned "
            f"and evaluated. Run it with `llama-cli -m {GGUF_FILE}` (or import it into Ollama / LM Studio).",
            "",
        ]
    lines += [f"## transformers\n\nNeeds {_requirements(fmt)}.\n", "```python", transformers_snippet(fmt, source,
              scheme).rstrip(), "```", ""]  # fmt: skip
    if fmt != "gguf" and (fmt != "fake" or act_bits >= 16):
        lines += ["## vLLM", "", "```python", vllm_snippet(source).rstrip(), "```", ""]
    if fmt != "gguf":  # lowbit's runtime reads safetensors exports only
        lowbit_code = lowbit_snippet(source, hub_id).rstrip()
        lines += ["## lowbit (CPU runtime, any format)", "", "```python", lowbit_code, "```", ""]
    evaluation = record.get("evaluation", {})
    if evaluation.get("after"):
        lines += ["## Perplexity", "", "| data | float | quantized |", "|---|---|---|"]
        for data, after in evaluation["after"].items():
            before = evaluation.get("before", {}).get(data, {})
            lines.append(f"| {data} | {before.get('ppl', float('nan')):.3f} | {after['ppl']:.3f} |")
        lines.append("")
    lines.append("The run record (`lowbit_record.json`) holds every setting, version and timing of the run.")
    return "\n".join(lines) + "\n"


def write_card(directory: Path, final: str | Path, fmt: str, record: dict[str, Any], hub_id: str | None = None) -> None:
    """Write README.md into the (temporary) export directory; its snippets name the final directory's name only."""
    (directory / CARD_FILE).write_text(model_card(fmt, Path(final).expanduser().resolve(), record, hub_id))
