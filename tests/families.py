"""Tiny random models of the newer families (Gemma 2, Gemma 3 text, Qwen3, Phi-3): 4 blocks, hidden 64.

Gemma's layers alternate sliding-window (window 4) and global attention with different rotary bases, so a block
replayed with another layer's kwargs computes something else. Norm weights are randomised (Gemma's start at 0,
i.e. a scale of 1 + 0) so that folds into them are really exercised.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, Phi3Config, Qwen3Config

LAYER_TYPES = ["sliding_attention", "full_attention"] * 2
COMMON = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
          "num_attention_heads": 4, "max_position_embeddings": 256, "bos_token_id": 0, "eos_token_id": 1,
          "pad_token_id": 1, "tie_word_embeddings": False}  # fmt: skip


def _config(family: str, kv_heads: int):
    if family == "gemma2":
        return Gemma2Config(**COMMON, num_key_value_heads=kv_heads, head_dim=16, sliding_window=4,
                            layer_types=LAYER_TYPES, query_pre_attn_scalar=16)  # fmt: skip
    if family == "gemma3":
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}}  # fmt: skip
        return Gemma3TextConfig(**COMMON, num_key_value_heads=kv_heads, head_dim=16, sliding_window=4,
                                layer_types=LAYER_TYPES, query_pre_attn_scalar=16, rope_parameters=rope)  # fmt: skip
    if family == "qwen3":
        return Qwen3Config(**COMMON, num_key_value_heads=kv_heads, head_dim=16)
    if family == "phi3":
        return Phi3Config(**COMMON, num_key_value_heads=kv_heads)
    raise KeyError(family)


def make_family(family: str, kv_heads: int = 4, seed: int = 0) -> torch.nn.Module:
    """A fresh tiny fp32 model of `family` with randomised norm weights, in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family, kv_heads)).eval()
    one_plus = family.startswith("gemma")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(-0.5, 0.5) if one_plus else param.uniform_(0.5, 1.5)
    return model


NEW_FAMILIES = ("gemma2", "gemma3", "qwen3", "phi3")


def block_io(model, arch, ids):
    """Each block's input and output in the model's own forward (hooks)."""
    ins, outs, handles = {}, {}, []
    for i, block in enumerate(arch.blocks(model)):
        handles.append(block.register_forward_pre_hook(
            lambda _m, args, kwargs, i=i: ins.__setitem__(i, (args[0] if args else kwargs["hidden_states"]).clone()),
            with_kwargs=True))  # fmt: skip
        handles.append(
            block.register_forward_hook(
                lambda _m, _a, out, i=i: outs.__setitem__(i, (out[0] if isinstance(out, tuple) else out).clone())
            )
        )
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return ins, outs


def assert_capture_replays(model, arch, captured, ids) -> None:
    """The captured first-block input and each block's own kwargs replay the model's forward exactly, block by block
    (from the hooked inputs and chained from the capture)."""
    from lowbit.engine import call_block

    ins, outs = block_io(model, arch, ids)
    assert torch.equal(captured.hidden, ins[0])
    hidden = captured.hidden
    with torch.no_grad():
        for i, block in enumerate(arch.blocks(model)):
            assert torch.equal(call_block(block, ins[i], captured.kwargs_for(i)), outs[i])
            hidden = call_block(block, hidden, captured.kwargs_for(i))
            assert torch.equal(hidden, outs[i])


# every stage, with options small enough for tiny models (tests of each family: runs or refuses clearly)
RECIPES = {
    "rtn": {},
    "hqq": {},
    "gptq": {},
    "awq+rtn": {"awq": {"n_grid": 3, "clip_grid": 3, "clip_tokens": 32}},
    "signround": {"signround": {"iters": 2, "batch_size": 2}},
    "teq+rtn": {"teq": {"steps": 2, "batch_size": 2, "eval_samples": 2}},
    "omniquant": {"omniquant": {"epochs": 1}},
    "desv": {"desv": {"epochs": 1, "n": 2}},
    "let+rtn": {"let": {"epochs": 1}},
    "awq+invarexplore+rtn": {
        "awq": {"n_grid": 3, "clip": False},
        "invarexplore": {"max_steps": 3, "samples": 2, "monitored_layers": 2, "progress": False, "batch_size": 2},
    },
}
