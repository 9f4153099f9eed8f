"""Sharded exports (large-models.md §6.2, §6.5): the block-by-block shard writer and the one export path.

A single-shard export must be byte for byte what lowbit wrote before the writer existed: `save_pretrained` for
`fake`, one `save_file` of the float remainder plus the packed tensors for compressed-tensors and GPTQ (the
references below rebuild those files the old way). A small `max_shard_size` gives several shards and an index that
transformers, compressed-tensors and lowbit's loader read with the same logits as the single file. The writer spills
each group to its own file and assembles shards from raw bytes: every shard is byte for byte one `save_file` of its
tensors (mixed dtypes, 0-d and empty tensors, odd names), and the writer keeps no reference to a group it took.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import math
import os
import random
import struct
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import lowbit
from conftest import make_llama, make_opt, save_model_dir
from lowbit.errors import LowbitError
from lowbit.export import compressed_tensors as ct
from lowbit.export import gptq
from lowbit.export import safetensors_layout as layout
from lowbit.export.blocks import block_export_tensors, block_prefixes, export_context, remainder_tensors
from lowbit.export.shards import INDEX_FILE, SINGLE_FILE, ShardWriter, parse_max_shard_size
from lowbit.models import load_model

IDS = torch.arange(3, 43).unsqueeze(0)
SMALL = "20KB"  # a tiny model's block is about 45 KB packed, 330 KB in fp32: every block in its own shard


def make_tied() -> LlamaForCausalLM:
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(config).eval()


FAMILIES = {"llama": make_llama, "opt": make_opt, "tied": make_tied}


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shard-sources")
    return {name: save_model_dir(root / name, make(), tokenizer) for name, make in FAMILIES.items()}


def _quantized(sources, family: str, scheme: str):
    return lowbit.quantize(load_model(str(sources[family])), recipe="rtn", scheme=scheme,
                           options={"engine": {"progress": False}})  # fmt: skip


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _weight_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("model*.safetensors"))


def _all_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in _weight_files(directory):
        part = load_file(path)
        assert not set(part) & set(tensors), "a tensor is in two shards"
        tensors.update(part)
    return tensors


# --- references: today's writers, rebuilt the old way ---------------------------------------------------------------


def _old_packed_file(result, fmt: str, path: Path) -> None:
    """The packed writer before shards: float_remainder over the whole state dict, then every layer, one save_file."""
    model, records = result.model, result.weights
    skip = {f"{name}.weight" for name in records}
    tensors, seen = {}, set()
    for key, tensor in model.state_dict().items():
        if key in skip:
            continue
        pointer = tensor.untyped_storage().data_ptr() if tensor.numel() else -1
        if pointer in seen and pointer != -1:
            continue
        seen.add(pointer)
        tensors[key] = tensor.detach().contiguous().cpu()
    dtype = model.get_input_embeddings().weight.dtype
    for name, record in records.items():
        layer = gptq.layer_tensors(record) if fmt == "gptq" else ct.layer_tensors(record, dtype)
        tensors.update({f"{name}.{key}": t for key, t in layer.items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_single_shard_fake_is_save_pretrained_byte_for_byte(family, sources, tmp_path):
    result = _quantized(sources, family, "w4g32")
    out = result.save(tmp_path / "fake", format="fake")
    result.model.save_pretrained(tmp_path / "reference")  # what write_fake called before the shard writer
    assert not (out / INDEX_FILE).exists()
    for name in (SINGLE_FILE, "config.json", "generation_config.json"):
        assert _sha(out / name) == _sha(tmp_path / "reference" / name), name


@pytest.mark.parametrize("family,scheme,fmt", [("llama", "w4g32", "compressed-tensors"),
    ("opt", "w4g32-sym", "compressed-tensors"), ("tied", "w4g32-sym", "compressed-tensors"),
    ("llama", "w4g32-sym", "gptq"), ("opt", "w4g32-sym_full", "gptq"), ("tied", "w4g32-sym", "gptq")])  # fmt: skip
def test_single_shard_packed_is_the_old_file_byte_for_byte(family, scheme, fmt, sources, tmp_path):
    result = _quantized(sources, family, scheme)
    out = result.save(tmp_path / "packed", format=fmt)
    _old_packed_file(result, fmt, tmp_path / "reference.safetensors")
    assert sorted(p.name for p in out.glob("*.safetensors*")) == [SINGLE_FILE]
    assert _sha(out / SINGLE_FILE) == _sha(tmp_path / "reference.safetensors")


# --- sharded exports -------------------------------------------------------------------------------------------------


def _check_index(directory: Path, single: Path) -> dict:
    """The index covers every tensor of the single-file export exactly once, where it is, with the right size."""
    index = json.loads((directory / INDEX_FILE).read_text())
    weight_map = index["weight_map"]
    assert list(weight_map) == sorted(weight_map)
    files = _weight_files(directory)
    count = len(files)
    assert count > 1 and [p.name for p in files] == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in
                                                     range(1, count + 1)]  # fmt: skip
    assert not (directory / SINGLE_FILE).exists() and not list(directory.glob(".*partial"))
    for path in files:
        with safe_open(str(path), "pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            assert all(weight_map[key] == path.name for key in handle.keys())  # noqa: SIM118
    sharded, reference = _all_tensors(directory), load_file(single / SINGLE_FILE)
    assert set(sharded) == set(weight_map) == set(reference)
    assert all(torch.equal(sharded[key], reference[key]) for key in reference)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in reference.values())
    return index


@pytest.fixture(scope="module")
def pairs(sources, tmp_path_factory):
    """fake, compressed-tensors and GPTQ exports of one result each, as one file and sharded at 20 KB."""
    root = tmp_path_factory.mktemp("shard-pairs")
    built = {}
    for fmt, scheme in (("fake", "w4g32"), ("compressed-tensors", "w4g32-sym"), ("gptq", "w4g32-sym")):
        result = _quantized(sources, "llama", scheme)
        single = result.save(root / f"{fmt}-single", format=fmt)
        sharded = result.save(root / f"{fmt}-sharded", format=fmt, max_shard_size=SMALL)
        with torch.no_grad():
            logits = result.model(IDS).logits
        built[fmt] = (result, single, sharded, logits)
    return built


@pytest.mark.parametrize("fmt", ["fake", "compressed-tensors", "gptq"])
def test_small_max_shard_size_gives_shards_and_a_complete_index(fmt, pairs):
    result, single, sharded, _ = pairs[fmt]
    index = _check_index(sharded, single)
    files = _weight_files(sharded)
    sizes = [sum(t.numel() * t.element_size() for t in load_file(p).values()) for p in files]
    blocks = block_prefixes(result.model)
    for prefix in blocks:  # a block is never split across shards
        assert len({file for key, file in index["weight_map"].items() if key.startswith(f"{prefix}.")}) == 1
    assert len(files) >= len(blocks) + 1 and sum(sizes) == index["metadata"]["total_size"]
    for name in ("config.json", "tokenizer.json", "lowbit_record.json"):
        assert (sharded / name).read_bytes() == (single / name).read_bytes() or name == "lowbit_record.json"


def test_sharded_fake_loads_in_transformers_with_the_single_file_logits(pairs):
    _, single, sharded, logits = pairs["fake"]
    with torch.no_grad():
        one = AutoModelForCausalLM.from_pretrained(single).eval()(IDS).logits
        many = AutoModelForCausalLM.from_pretrained(sharded).eval()(IDS).logits
    assert torch.equal(many, one) and torch.equal(many, logits)


def test_sharded_compressed_tensors_loads_in_transformers_with_the_single_file_logits(pairs):
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is a test extra: pip install -e '.[test]'")
    _, single, sharded, logits = pairs["compressed-tensors"]
    script = Path(__file__).with_name("thirdparty_ct_load.py")  # a fresh process without lowbit
    done = subprocess.run([sys.executable, str(script), str(single), str(sharded)], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    one, many = (torch.load(d / "thirdparty.pt")["logits"] for d in (single, sharded))
    assert torch.equal(many, one)
    torch.testing.assert_close(many, logits, rtol=0, atol=1e-3 * float(logits.abs().max()))


@pytest.mark.parametrize("fmt", ["fake", "compressed-tensors", "gptq"])
def test_lowbit_load_reads_a_sharded_export(fmt, pairs):
    _, single, sharded, logits = pairs[fmt]
    with torch.no_grad():
        one = lowbit.load(single, kernel="reference").model(IDS).logits
        many = lowbit.load(sharded, kernel="reference").model(IDS).logits
    assert torch.equal(many, one) and torch.equal(many, logits)


@pytest.mark.parametrize("fmt", ["fake", "gptq"])
def test_sharded_bytes_are_deterministic(fmt, sources, tmp_path):
    result = _quantized(sources, "opt", "w4g32-sym")
    runs = [result.save(tmp_path / f"run{i}", format=fmt, max_shard_size=SMALL) for i in range(2)]
    names = [sorted(p.name for p in run.iterdir() if "safetensors" in p.name) for run in runs]
    assert names[0] == names[1] and len(names[0]) > 2
    assert all((runs[0] / n).read_bytes() == (runs[1] / n).read_bytes() for n in names[0])


# --- the per-block path a streamed run takes -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,scheme", [("fake", "w4g32"), ("compressed-tensors", "w4g32-sym"),
                                        ("gptq", "w4g32-sym")])  # fmt: skip
def test_blocks_freed_after_their_export_give_the_resident_files(fmt, scheme, sources, tmp_path):
    """add_block, then drop the block to meta (as streaming frees it): the same bytes as QuantizedModel.save."""
    result = _quantized(sources, "tied", scheme)
    resident = result.save(tmp_path / "resident", format=fmt, max_shard_size=SMALL)
    model = result.model
    context = export_context(fmt, model)
    prefixes = block_prefixes(model)
    streamed = tmp_path / "streamed"
    streamed.mkdir()
    writer = ShardWriter(streamed, parse_max_shard_size(SMALL))
    for prefix in prefixes:
        block = model.get_submodule(prefix)
        writer.add_block(block_export_tensors(context, prefix, result.weights, block))
        block.to("meta")  # the writer keeps what it still has to write
    metadata = {"total_parameters": model.num_parameters()} if fmt == "fake" else None
    files = writer.finish(remainder_tensors(context, model, result.weights, prefixes), metadata)
    assert files[-1] == INDEX_FILE and len(files) > 2
    for name in files:
        assert (streamed / name).read_bytes() == (resident / name).read_bytes(), name


def test_a_meta_tensor_is_refused_and_nothing_is_written(sources, tmp_path):
    result = _quantized(sources, "llama", "w4g32")
    block = result.model.model.layers[1]
    block.input_layernorm.weight = nn.Parameter(torch.empty(64, device="meta"))  # a block never materialized
    for fmt in ("fake", "compressed-tensors"):
        with pytest.raises(LowbitError, match=r"model\.layers\.1\.input_layernorm\.weight is on the meta device"):
            result.save(tmp_path / fmt, format=fmt)
    assert list(tmp_path.iterdir()) == []


def test_bad_options_are_refused_before_anything_is_written(sources, tmp_path):
    """The packed tensors are built while writing, so what would fail there is checked first."""
    result = _quantized(sources, "llama", "w4g32")
    with pytest.raises(LowbitError, match="max_shard_size='5 gigs'.*'500MB' or '5GB'"):
        result.save(tmp_path / "out", format="fake", max_shard_size="5 gigs")
    with pytest.raises(LowbitError, match="unknown packer 'bogus'"):
        result.save(tmp_path / "out", format="compressed-tensors", packer="bogus")
    assert list(tmp_path.iterdir()) == []


# --- ShardWriter and the size parser ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value,expected", [(1000, 1000), ("500MB", 500 * 10**6), ("5GB", 5 * 10**9),
    ("2GiB", 2 * 2**30), ("20KB", 20_000), ("1.5MB", 1_500_000), ("8Mb", 10**6), ("123", 123)])  # fmt: skip
def test_max_shard_size_follows_transformers(value, expected):
    assert parse_max_shard_size(value) == expected


@pytest.mark.parametrize("value", [0, -5, "0GB", "five", "5XB", "", True, 1.5, None])
def test_max_shard_size_refuses_what_is_not_a_size(value):
    with pytest.raises(LowbitError, match="'5GB'"):
        parse_max_shard_size(value)


def test_one_shard_is_one_save_file(tmp_path):
    groups = [{"b.x": torch.ones(3), "b.y": torch.arange(4, dtype=torch.int32)}, {"a.z": torch.zeros(2, 2)}]
    writer = ShardWriter(tmp_path, 10**6)
    for group in groups:
        writer.add_block(group)
    assert writer.finish({"c": torch.ones(1, dtype=torch.float16)}) == [SINGLE_FILE]
    reference = tmp_path / "reference.safetensors"
    save_file({**groups[1], "c": torch.ones(1, dtype=torch.float16), **groups[0]}, reference, metadata={"format": "pt"})
    assert (tmp_path / SINGLE_FILE).read_bytes() == reference.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE_FILE, "reference.safetensors"]


def test_groups_stay_whole_and_a_closed_shard_leaves_memory(tmp_path):
    writer = ShardWriter(tmp_path, 100)
    first = {"g0.a": torch.ones(10), "g0.b": torch.ones(10)}  # 80 bytes: the shard stays open
    storages = [weakref.ref(t.untyped_storage()) for t in first.values()]
    writer.add_block(first)
    writer.add_block({"g1.a": torch.ones(10)})  # 80 + 40 > 100: g0 is written first, g1 opens the next shard
    del first
    gc.collect()
    assert all(ref() is None for ref in storages)  # written and released
    writer.add_block({"g2.a": torch.ones(30)})  # 120 bytes alone: its own (oversized) shard
    files = writer.finish({"tail": torch.ones(2)})
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert files == [*(f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)), INDEX_FILE]
    assert index["weight_map"] == {"g0.a": files[0], "g0.b": files[0], "g1.a": files[1], "g2.a": files[2],
                                   "tail": files[3]}  # fmt: skip
    assert index["metadata"] == {"total_size": 80 + 40 + 120 + 8}


def test_meta_and_duplicate_names_raise_and_tied_tensors_are_written_once(tmp_path):
    writer = ShardWriter(tmp_path, 10**6)
    with pytest.raises(LowbitError, match="w is on the meta device"):
        writer.add_block({"w": torch.empty(3, device="meta")})
    embed = torch.randn(5, 4)
    writer.add_block({"embed.weight": embed})
    with pytest.raises(LowbitError, match="embed.weight was given twice"):
        writer.add_block({"embed.weight": torch.ones(1)})
    writer.add_block({"head.weight": embed, "head.half": embed[:2]})  # tied, and a different view of it
    writer.finish()
    written = load_file(tmp_path / SINGLE_FILE)
    assert sorted(written) == ["embed.weight", "head.half"]
    assert torch.equal(written["embed.weight"], embed) and torch.equal(written["head.half"], embed[:2])


def test_add_block_spills_the_group_to_its_file_and_lets_it_go(tmp_path):
    """At most one group in memory: after add_block the writer holds no tensor of it, only its file."""
    writer = ShardWriter(tmp_path, 10**6)
    group = {"b.w": torch.randn(4, 4), "b.h": torch.randn(8).to(torch.float16)[::2]}  # a strided view is copied
    refs = [weakref.ref(t) for t in group.values()] + [weakref.ref(t.untyped_storage()) for t in group.values()]
    expected = {name: t.contiguous().clone() for name, t in group.items()}
    writer.add_block(group)
    del group
    gc.collect()
    assert all(ref() is None for ref in refs)
    assert writer.groups_done == 1 and [p.name for p in tmp_path.iterdir()] == [".group-00000.safetensors.partial"]
    spilled = load_file(writer.group_file(0))
    assert spilled.keys() == expected.keys() and all(torch.equal(spilled[k], expected[k]) for k in expected)
    writer.add_block({"c": torch.ones(2)})
    assert writer.groups_done == 2 and writer.group_file(1).exists()
    assert writer.finish() == [SINGLE_FILE] and writer.groups_done == 2
    assert [p.name for p in tmp_path.iterdir()] == [SINGLE_FILE]  # the group files went into the shard


def test_group_files_are_deleted_as_their_shard_closes(tmp_path):
    writer = ShardWriter(tmp_path, 100)
    writer.add_block({"g0.a": torch.ones(10), "g0.b": torch.ones(10)})  # 80 bytes: open
    writer.add_block({"g1.a": torch.ones(10)})  # closes shard 1 (g0), g1 waits in its file
    assert sorted(p.name for p in tmp_path.iterdir()) == [".group-00001.safetensors.partial",
                                                          ".shard-00001.safetensors.partial"]  # fmt: skip
    embed = torch.randn(5, 4)
    writer.add_block({"embed": embed})
    writer.add_block({"head": embed})  # a group left empty by a tie: no file, but counted
    assert writer.groups_done == 4 and not writer.group_file(3).exists()
    assert list(writer._storages.values())[0][1] == {(0, (5, 4), (4, 1), torch.float32): "embed"}
    assert len(writer._storages) == 1  # weak entries only: the groups' freed storages are forgotten
    del embed
    gc.collect()
    assert writer._storages == {}
    writer.finish()
    assert sorted(json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]) == ["embed", "g0.a", "g0.b", "g1.a"]
    assert not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("sync", [False, True])
def test_sync_fsyncs_each_shard(sync, tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    writer = ShardWriter(tmp_path, 40, sync=sync)
    for index in range(3):
        writer.add_block({f"g{index}": torch.ones(10)})  # 40 bytes: one shard each
    assert len(writer.finish()) == 4
    assert len(synced) == (3 if sync else 0)


# --- byte identity of assembled shards with save_file ----------------------------------------------------------------

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.uint16, torch.float16, torch.bfloat16, torch.int32,
          torch.uint32, torch.float32, torch.complex64, torch.float64, torch.int64, torch.uint64, torch.float8_e4m3fn,
          torch.float8_e5m2]  # fmt: skip
SHAPES = [(), (0,), (3, 0), (1,), (5,), (2, 3), (1, 1, 7)]
ODD_NAMES = ["a", "b.weight", "Z", "é", 'x"q', "back\\slash", "nl\n", "ctl\x01\x1f", "del\x7f", "emoji\U0001f600",
             "\u2028", "tab\t", "", "a.10", "a.9"]  # fmt: skip


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bytes of this dtype and shape (bools 0/1), each tensor with its own storage."""
    generator = torch.Generator().manual_seed(seed)
    count = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    high = 2 if dtype == torch.bool else 256
    return torch.randint(0, high, (count,), dtype=torch.uint8, generator=generator).view(dtype).reshape(shape)


def _expected_layout(groups: list[dict[str, torch.Tensor]], max_bytes: int) -> list[list[str]]:
    """The shard boundary rule: close before a group that would overflow, and as soon as a shard is full."""
    shards, names, size = [], [], 0
    for group in groups:
        group_bytes = sum(t.numel() * t.element_size() for t in group.values())
        if names and size + group_bytes > max_bytes:
            shards, names, size = [*shards, names], [], 0
        names, size = names + list(group), size + group_bytes
        if size >= max_bytes:
            shards, names, size = [*shards, names], [], 0
    return [*shards, names] if names or not shards else shards


def _check_writer_against_save_file(directory: Path, groups: list[dict[str, torch.Tensor]], max_bytes: int) -> None:
    writer = ShardWriter(directory, max_bytes)
    for group in groups[:-1]:
        writer.add_block(group)
    files = writer.finish(groups[-1] if groups else None)  # finish's extra: each tensor its own group
    tail = [{name: t} for name, t in (groups[-1] if groups else {}).items()]
    shards = _expected_layout(groups[:-1] + tail, max_bytes)
    everything = {name: t for group in groups for name, t in group.items()}
    assert sorted(p.name for p in directory.iterdir()) == sorted(files)  # no .partial left
    assert writer.groups_done == len(groups) - 1 + len(tail)
    if len(shards) == 1:
        assert files == [SINGLE_FILE]
    else:
        weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
        written = [sorted(key for key, where in weight_map.items() if where == file) for file in files[:-1]]
        assert written == [sorted(names) for names in shards]
    reference = directory.parent / f"{directory.name}.reference"
    for file, names in zip(files, shards, strict=False):
        save_file({name: everything[name] for name in names}, str(reference), metadata={"format": "pt"})
        assert (directory / file).read_bytes() == reference.read_bytes(), file
    reference.unlink()


def test_assembled_shards_are_save_file_byte_for_byte_fixed(tmp_path):
    """Every dtype and shape, odd names, one file and shards of every size, groups of one and of many."""
    tensors = [(name, _tensor(DTYPES[i % len(DTYPES)], SHAPES[i % len(SHAPES)], i)) for i, name in enumerate(ODD_NAMES)]
    tensors += [(f"blk.{i}", _tensor(dtype, shape, 100 + i)) for i, (dtype, shape) in enumerate(
        (dtype, shape) for dtype in DTYPES for shape in SHAPES)]  # fmt: skip
    random.Random(0).shuffle(tensors)
    groups = [dict(tensors[start : start + 9]) for start in range(0, len(tensors), 9)]
    for max_bytes in (1, 64, 300, 10**6):
        directory = tmp_path / f"max{max_bytes}"
        directory.mkdir()
        _check_writer_against_save_file(directory, groups, max_bytes)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(st.tuples(st.text(max_size=6), st.sampled_from(DTYPES), st.sampled_from(SHAPES)), max_size=14,
                   unique_by=lambda spec: spec[0]),
    cuts=st.lists(st.integers(0, 14), max_size=4),
    max_bytes=st.sampled_from([1, 16, 100, 10**6]),
)  # fmt: skip
def test_assembled_shards_are_save_file_byte_for_byte(specs, cuts, max_bytes):
    specs = [spec for spec in specs if spec[0] != "__metadata__"]
    tensors = [(name, _tensor(dtype, shape, seed)) for seed, (name, dtype, shape) in enumerate(specs)]
    bounds = sorted({0, len(tensors), *(min(cut, len(tensors)) for cut in cuts)})
    groups = [dict(tensors[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)] or [{}]
    with tempfile.TemporaryDirectory() as root:
        directory = Path(root) / "out"
        directory.mkdir()
        _check_writer_against_save_file(directory, groups, max_bytes)


# --- safetensors_layout: the exact rules -----------------------------------------------------------------------------


def test_dtype_order_is_safetensors_data_order(tmp_path):
    """Descending `Dtype` enum order, not size: U64 > I64 > F64 > C64, BF16 > F16 > U16 > I16, U8 > F4 > BOOL."""
    dtypes = [*DTYPES, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.float8_e8m0fnu]
    tensors = {f"{len(dtypes) - i:02d}": _tensor(dtype, (2,), i) for i, dtype in enumerate(dtypes)}  # names reversed
    tensors["f4"] = torch.zeros(2, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    save_file(tensors, str(tmp_path / "all.safetensors"))
    written = [entry.dtype for entry in layout.read_entries(tmp_path / "all.safetensors")]
    assert len(written) == len(set(written)) == len(tensors)
    assert written == [dtype for dtype in reversed(layout.DTYPE_ORDER) if dtype in written]
    assert written == [entry.dtype for entry in layout.ordered(layout.read_entries(tmp_path / "all.safetensors"))]


def test_encode_header_exactly():
    entries = [layout.Entry("b", "F16", (2,), 4), layout.Entry("é\n", "BOOL", (0,), 0), layout.Entry("a", "I64", (), 8),
               layout.Entry("c", "BF16", (1, 1), 2)]  # fmt: skip
    text = (b'{"__metadata__":{"format":"pt"},"a":{"dtype":"I64","shape":[],"data_offsets":[0,8]},'
            b'"c":{"dtype":"BF16","shape":[1,1],"data_offsets":[8,10]},'
            b'"b":{"dtype":"F16","shape":[2],"data_offsets":[10,14]},'
            + '"é\\n":{"dtype":"BOOL","shape":[0],"data_offsets":[14,14]}}'.encode())  # fmt: skip
    padded = text + b" " * (-len(text) % 8)
    assert layout.encode_header(layout.ordered(entries), {"format": "pt"}) == struct.pack("<Q", len(padded)) + padded
    assert layout.encode_header([], None) == struct.pack("<Q", 8) + b"{}      "
    with pytest.raises(LowbitError, match="__metadata__"):
        layout.encode_header([layout.Entry("__metadata__", "F32", (), 4)], None)
    with pytest.raises(LowbitError, match="unknown to lowbit"):
        layout.ordered([layout.Entry("x", "F7", (), 1), layout.Entry("y", "F32", (), 4)])


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}])
@pytest.mark.parametrize("copy", ["kernel", "refused", "absent"])
def test_merge_is_save_file_whatever_the_copy(copy, metadata, tmp_path, monkeypatch):
    """copy_file_range, or plain reads and writes in small chunks when it is refused (EXDEV) or missing."""
    if copy == "refused":
        monkeypatch.setattr(os, "copy_file_range", lambda *a: (_ for _ in ()).throw(OSError(errno.EXDEV, "xdev")),
                            raising=False)  # fmt: skip
    elif copy == "absent":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    if copy != "kernel":
        monkeypatch.setattr(layout, "CHUNK_BYTES", 3)
    tensors = {name: _tensor(DTYPES[i % len(DTYPES)], SHAPES[i % len(SHAPES)], i) for i, name in enumerate(ODD_NAMES)}
    items = list(tensors.items())
    sources = []
    for index, start in enumerate(range(0, len(items), 4)):
        sources.append(tmp_path / f"part{index}.safetensors")
        save_file(dict(items[start : start + 4]), str(sources[-1]))
    names = layout.merge(sources, tmp_path / "merged.safetensors", metadata, remove=True)
    save_file(tensors, str(tmp_path / "reference.safetensors"), metadata=metadata)
    assert (tmp_path / "merged.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    assert names == [entry.name for entry in layout.read_entries(tmp_path / "reference.safetensors")]
    assert not any(path.exists() for path in sources)


def test_a_truncated_group_file_is_refused(tmp_path):
    save_file({"w": torch.ones(4)}, str(tmp_path / "g.safetensors"))
    data = (tmp_path / "g.safetensors").read_bytes()
    (tmp_path / "g.safetensors").write_bytes(data[:-1])
    with pytest.raises(LowbitError, match="truncated"):
        layout.read_entries(tmp_path / "g.safetensors")
    (tmp_path / "g.safetensors").write_bytes(b"\xff" * 8)
    with pytest.raises(LowbitError, match="not a safetensors file"):
        layout.read_entries(tmp_path / "g.safetensors")
