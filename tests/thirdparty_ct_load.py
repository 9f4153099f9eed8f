"""Run in a fresh process: load compressed-tensors exports with transformers + compressed-tensors only.

Never imports lowbit. For each directory given, writes `thirdparty.pt` there: logits on fixed ids and a 16-token
greedy continuation. Asymmetric exports load with `CompressedTensorsConfig(dequantize=True)`: transformers 5.23's
default (compressed) path builds the zero point with its unpacked shape on the meta device and then rejects the
packed tensor every compressed-tensors writer produces (size mismatch), for lowbit's exports and llm-compressor's
alike; the dequantize path runs compressed-tensors' own decompressor. W8A8 `int-quantized` exports load on the
default path (int8 weights, dynamic per-token int8 input activations) and, as `dequantized_logits`, once more with
`dequantize=True` (decompressed weights, no activation quantization).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, CompressedTensorsConfig


def main(directories: list[str]) -> None:
    for directory in directories:
        qc = json.loads((Path(directory) / "config.json").read_text())["quantization_config"]
        symmetric = all(group["weights"]["symmetric"] for group in qc["config_groups"].values())
        kwargs = {} if symmetric else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs).eval()
        ids = torch.arange(3, 43).unsqueeze(0)
        with torch.no_grad():
            logits = model(ids).logits
            generated = model.generate(ids[:, :8], max_new_tokens=16, do_sample=False, pad_token_id=0)
        result = {"logits": logits, "generated": generated, "dequantize": not symmetric}
        if qc["format"] == "int-quantized":  # W8A8: also the decompressed weights without activation quantization
            plain = AutoModelForCausalLM.from_pretrained(
                directory, quantization_config=CompressedTensorsConfig(dequantize=True)
            ).eval()
            with torch.no_grad():
                result["dequantized_logits"] = plain(ids).logits
        torch.save(result, Path(directory) / "thirdparty.pt")
    assert "lowbit" not in sys.modules, "the third-party check must not import lowbit"


if __name__ == "__main__":
    main(sys.argv[1:])
