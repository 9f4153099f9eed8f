"""Streaming, read side: synthetic checkpoints, the lazy reader, and a meta skeleton whose blocks are read on demand.

Every family's synthetic checkpoint is opened twice: resident (lowbit.models.load_model) and streamed. With every
block materialized, each parameter and buffer and the full-model logits must be identical. Shards are tiny, so
blocks straddle shard boundaries.
"""

from __future__ import annotations

import importlib.util
import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from lowbit import synthetic
from lowbit.arch import arch_for
from lowbit.engine.checkpoint import INDEX_FILE, CheckpointReader
from lowbit.engine.skeleton import meta_tensors, open_streamed
from lowbit.errors import LowbitError
from lowbit.models import load_model
from lowbit.synthetic import write_synthetic_checkpoint

VOCAB = 320  # the conftest tokenizer's
SHAPE = {"hidden_size": 32, "intermediate_size": 48, "num_layers": 2, "num_heads": 4, "vocab_size": VOCAB}
SHARD = 7000  # bytes: a block (~9-30 KB) always spans shards
IDS = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
# (family, at-rest dtype, tied); qwen3_moe gets 4 experts
CASES = [
    ("llama", torch.bfloat16, False),
    ("llama", torch.float16, True),
    ("qwen3", torch.bfloat16, False),
    ("gemma3", torch.bfloat16, True),
    ("gemma3", torch.float16, False),
    ("phi3", torch.float16, False),
    ("opt", torch.bfloat16, True),
    ("opt", torch.float16, False),
    ("qwen3_moe", torch.bfloat16, False),
    ("qwen3_moe", torch.float16, True),
]


def write(path: Path, family: str = "llama", dtype=torch.bfloat16, tie: bool = False, **extra) -> Path:
    overrides = {
        "qwen3_moe": {"num_experts": 4},
        # both attention kinds, each with its own rotary buffers, and a window shorter than IDS
        "gemma3": {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 4},
    }.get(family)
    kv_heads = 4 if family == "opt" else 2
    options = {"max_shard_bytes": SHARD, "config_overrides": overrides, **extra}
    return write_synthetic_checkpoint(
        path, family=family, num_kv_heads=kv_heads, dtype=dtype, tie_word_embeddings=tie, **SHAPE, **options
    )


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}


def assert_same_state(resident: torch.nn.Module, streamed: torch.nn.Module) -> None:
    expected, got = state(resident), state(streamed)
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def split_blocks(path: Path, num_layers: int) -> list[int]:
    """Blocks whose tensors lie in more than one shard."""
    weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    return [i for i in range(num_layers) if len({s for k, s in weight_map.items() if f"layers.{i}." in k}) > 1]


@pytest.mark.parametrize(("family", "dtype", "tie"), CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_streamed_equals_resident(tmp_path, tokenizer_dir, family, dtype, tie):
    path = write(tmp_path / "ckpt", family, dtype, tie, tokenizer_dir=tokenizer_dir)
    assert split_blocks(path, SHAPE["num_layers"])
    resident = load_model(str(path)).model
    streamed = open_streamed(path)
    model, arch = streamed.model, arch_for(streamed.model)
    assert streamed.source_dtype == dtype and streamed.num_blocks == SHAPE["num_layers"]
    embedding, output = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert (output is embedding) == tie and not output.is_meta and not embedding.is_meta
    assert all(streamed.is_materialized(i) is False for i in range(streamed.num_blocks))
    for i in range(streamed.num_blocks):
        block = streamed.materialize_block(i)
        assert block is arch.blocks(model)[i] and not meta_tensors(block)
        assert all(t.dtype == torch.float32 for t in block.parameters())
    assert_same_state(resident, model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS, use_cache=False).logits, resident(input_ids=IDS).logits)
    stored = streamed.read_block_stored(0)
    assert list(stored) == streamed.block_keys(0) and {t.dtype for t in stored.values()} == {dtype}


def test_release_frees_and_rematerializes(tmp_path):
    streamed = open_streamed(write(tmp_path / "ckpt", "qwen3_moe"))
    block = streamed.materialize_block(1)
    arch = arch_for(streamed.model)
    reference = {name: t.clone() for name, t in state(block).items()}
    streamed.release_block(1)
    assert all(p.is_meta for p in block.parameters()) and not streamed.is_materialized(1)
    assert not any(b.is_meta for b in streamed.model.buffers())  # rotary inv_freq stays real
    assert not streamed.is_materialized(0)  # never read
    assert_same_state_dict(reference, state(streamed.materialize_block(1)))
    # a block prepared for the stages (per-expert linears, the checkpoint's own names) re-reads the same way
    arch.prepare_block(block)
    prepared = {name: t.clone() for name, t in state(block).items()}
    with streamed.materialized(1) as again:
        assert again is block
    assert not streamed.is_materialized(1)
    assert_same_state_dict(prepared, state(streamed.materialize_block(1)))


def assert_same_state_dict(expected: dict, got: dict) -> None:
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)


@pytest.mark.parametrize("family", synthetic.FAMILIES)
def test_synthetic_names_are_save_pretrained_names(tmp_path, family):
    """Keys and shapes equal what save_pretrained writes for the same config; transformers loads it cleanly."""
    tie = family in ("gemma3", "opt")
    path = write(tmp_path / "synthetic", family, tie=tie)
    config = AutoConfig.from_pretrained(path)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "saved")
    synthetic_reader, saved_reader = CheckpointReader(path), CheckpointReader(tmp_path / "saved")
    saved_keys = saved_reader.keys()
    assert sorted(synthetic_reader.keys()) == sorted(saved_keys)
    assert all(synthetic_reader.shape_of(k) == saved_reader.shape_of(k) for k in saved_keys)
    _, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info


def test_missing_key_names_key_and_shard(tmp_path):
    path = write(tmp_path / "ckpt")
    index = json.loads((path / INDEX_FILE).read_text())
    key = "model.layers.1.mlp.up_proj.weight"
    del index["weight_map"][key]
    (path / INDEX_FILE).write_text(json.dumps(index))
    streamed = open_streamed(path)  # the non-block tensors are all there
    streamed.materialize_block(0)
    with pytest.raises(LowbitError, match=rf"no tensor '{key}' \(expected in model-\d+-of-\d+\.safetensors"):
        streamed.materialize_block(1)
    del index["weight_map"]["model.norm.weight"]
    (path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(LowbitError, match="no tensor 'model.norm.weight'"):
        open_streamed(path)


def test_meta_guards_name_the_tensor(tmp_path):
    streamed = open_streamed(write(tmp_path / "ckpt"))
    block = streamed.blocks[0]
    block.register_buffer("stray", torch.empty(3, device="meta"), persistent=False)
    with pytest.raises(LowbitError, match="block 0 .* still has meta tensors .*stray"):
        streamed.materialize_block(0)
    block.extra = torch.nn.Parameter(torch.empty(3, device="meta"))
    with pytest.raises(LowbitError, match="no tensor 'model.layers.0.extra'"):
        streamed.materialize_block(0)
    del block.extra
    streamed.release_block(1)
    read = streamed.reader.read
    streamed.reader.read = lambda names, dtype=None: {k: v.fill_(float("nan")) for k, v in read(names, dtype).items()}
    with pytest.raises(LowbitError, match="weight 'model.layers.1.*' .* NaN or Inf"):
        streamed.materialize_block(1)


def test_checkpoint_without_base_model_prefix(tmp_path):
    """A checkpoint saved from the bare base model (keys without "model.") streams to the same weights."""
    path = write(tmp_path / "ckpt", tie=True, max_shard_bytes=10**9)
    bare = tmp_path / "bare"
    bare.mkdir()
    tensors = load_file(path / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, bare / "model.safetensors")
    (bare / "config.json").write_text((path / "config.json").read_text())
    streamed, reference = open_streamed(bare), open_streamed(path)
    assert streamed.reader.strip_prefix == "model." and streamed.block_keys(0) == reference.block_keys(0)
    for i in range(streamed.num_blocks):
        streamed.materialize_block(i), reference.materialize_block(i)
    assert_same_state(reference.model, streamed.model)


def test_refusals(tmp_path):
    path = write(tmp_path / "ckpt", max_shard_bytes=10**9)
    pickle_only = tmp_path / "pickle"
    pickle_only.mkdir()
    (pickle_only / "config.json").write_text((path / "config.json").read_text())
    (pickle_only / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(LowbitError, match="only pickle weights .*needs safetensors"):
        open_streamed(pickle_only)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(
        json.dumps({**config, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    with pytest.raises(LowbitError, match="streaming does not support model type 'gpt2'"):
        open_streamed(path)


def test_writer_is_deterministic(tmp_path):
    first, second = write(tmp_path / "a", seed=3), write(tmp_path / "b", seed=3)
    other = write(tmp_path / "c", seed=4)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir()) and len(names) > 3
    assert all((first / n).read_bytes() == (second / n).read_bytes() for n in names)
    shards = [n for n in names if n.endswith(".safetensors")]
    assert all((first / n).read_bytes() != (other / n).read_bytes() for n in shards)
    with pytest.raises(LowbitError, match="already holds safetensors"):
        write(tmp_path / "a")


def test_writer_holds_one_tensor_at_a_time(tmp_path, monkeypatch):
    alive, peak, made = [0], [0], []
    original = synthetic._tensor

    def tracked(entry, seed, dtype):
        value = original(entry, seed, dtype)
        alive[0] += 1
        peak[0] = max(peak[0], alive[0])
        made.append(entry.key)
        weakref.finalize(value, lambda: alive.__setitem__(0, alive[0] - 1))
        return value

    monkeypatch.setattr(synthetic, "_tensor", tracked)
    path = write(tmp_path / "ckpt", "qwen3_moe")
    assert peak[0] == 1 and sorted(made) == sorted(CheckpointReader(path).keys())


def test_cli_writes_and_resolves_presets(tmp_path, tokenizer_dir):
    spec = importlib.util.spec_from_file_location(
        "make_synth", Path(__file__).parents[1] / "benchmarks/make_synthetic_checkpoint.py"
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = cli.build_parser().parse_args(["--out", str(tmp_path / "x"), "--preset", "llama2-7b", "--layers", "2"])
    assert cli.resolve(args) == {"family": "llama", "hidden": 4096, "intermediate": 11008, "layers": 2, "heads": 32,
                                 "kv_heads": 32, "vocab": 32000}  # fmt: skip
    out = cli.main(["--out", str(tmp_path / "tiny"), "--family", "phi3", "--hidden", "32", "--intermediate", "48",
                    "--layers", "2", "--heads", "4", "--kv-heads", "2", "--vocab", str(VOCAB), "--tie",
                    "--max-shard-size", "10KB", "--tokenizer-dir", str(tokenizer_dir)])  # fmt: skip
    loaded = load_model(str(out))
    assert loaded.model.config.tie_word_embeddings and (out / INDEX_FILE).is_file()
    assert synthetic.parse_size("2GB") == 2 * 10**9 and synthetic.parse_size("1.5MiB") == 3 * 2**19


def test_reader_headers_and_mmap_fallback(tmp_path, monkeypatch):
    """Headers give dtype and shape with no data read; without pread, reads clone out of the mapping."""
    from lowbit.engine import checkpoint

    reader = CheckpointReader(write(tmp_path / "ckpt", dtype=torch.float16))
    key = "model.layers.0.self_attn.k_proj.weight"
    assert reader.dtype_of(key) == torch.float16 and reader.shape_of(key) == (16, 32)
    assert reader.bytes_by_dtype() == {torch.float16: sum(reader.nbytes_of(k) for k in reader)}
    via_pread = reader.read([key, "model.norm.weight"])
    monkeypatch.setattr(checkpoint, "_pread", False)
    via_mmap = reader.read([key, "model.norm.weight"])
    converted = reader.read([key], dtype=torch.float32)[key]
    assert all(torch.equal(via_pread[k], via_mmap[k]) for k in via_pread)
    assert converted.dtype == torch.float32 and torch.equal(converted, via_pread[key].float())
