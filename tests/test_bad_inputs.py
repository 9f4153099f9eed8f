"""The bad-input battery (issue 14): every broken input is refused through the CLI the same clean way.

Each case builds one broken input from a private copy of the tiny Llama and returns the CLI arguments. The run
must exit 2 with exactly one `error:` line that names the problem and the fix (checked by keywords), print no
traceback, create no output (nor temp, lock or work directories next to it) and leave every input file
byte-identical. Adding a case is one row in CASES.
"""
# ruff: noqa: E501  (one case per line in CASES, however long)

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from conftest import make_tokenizer, save_model_dir
from lowbit.cli import main
from lowbit.export.atomic import output_lock


@dataclass
class Env:
    """The inputs of one case: a private model copy, a text file, the --out path and what must stay unchanged."""

    tmp: Path
    model: Path
    text: Path
    out: Path
    monkeypatch: pytest.MonkeyPatch
    inputs: list[Path] = field(default_factory=list)
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def quantize(self, *extra: object, model: Path | None = None, out: bool = True) -> list[str]:
        args = ["quantize", model or self.model, "--recipe", "rtn", *extra]
        return [str(a) for a in (*args, "--out", self.out)] if out else [str(a) for a in args]

    def calibrate(self, path: Path, *extra: object) -> list[str]:
        return self.quantize("--recipe", "gptq", "--dataset", path, "--nsamples", 2, "--seqlen", 32, *extra)

    def input_file(self, name: str, data: bytes | str) -> Path:
        path = self.tmp / "inputs" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        self.inputs.append(path)
        return path

    def edit_config(self, **changes: object) -> None:
        config = json.loads((self.model / "config.json").read_text())
        config.update(changes)
        for key in [k for k, v in changes.items() if v is None]:
            del config[key]
        (self.model / "config.json").write_text(json.dumps(config))

    def mount_tmpfs(self, options: str) -> Path:
        where = self.tmp / "mnt"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        self.cleanups.append(lambda: subprocess.run(["umount", "-l", str(where)], check=False))
        return where


# --- builders: each breaks one thing and returns the CLI arguments ------------------------------------------


def _poison(env: Env, value: float) -> list[str]:
    weights = env.model / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = value
    save_file(tensors, weights, metadata={"format": "pt"})
    return env.quantize()


def _gpt2(env: Env) -> list[str]:
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320))
    path = save_model_dir(env.tmp / "gpt2", model, make_tokenizer())
    env.inputs.append(path)
    return env.quantize(model=path)


def _pickle_only(env: Env) -> list[str]:
    weights = env.model / "model.safetensors"
    torch.save(load_file(weights), env.model / "pytorch_model.bin")
    weights.unlink()
    return env.quantize()


def _truncate(env: Env) -> list[str]:
    weights = env.model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return env.quantize()


def _remove(env: Env, *names: str) -> list[str]:
    for name in names:
        (env.model / name).unlink()
    return env.quantize()


def _overwrite(env: Env, name: str, text: str) -> list[str]:
    (env.model / name).write_text(text)
    return env.quantize()


def _empty_dir(env: Env) -> list[str]:
    empty = env.tmp / "empty-model"
    empty.mkdir()
    return env.quantize(model=empty)


def _existing_out(env: Env) -> list[str]:
    env.out.mkdir()
    (env.out / "keep.txt").write_text("an earlier export")
    env.inputs.append(env.out)
    return env.quantize()


def _out_is_file(env: Env) -> list[str]:
    env.out.write_text("not a directory")
    env.inputs.append(env.out)
    return env.quantize()


def _out_under_file(env: Env) -> list[str]:
    (env.tmp / "afile").write_text("a regular file")
    env.out = env.tmp / "afile" / "out"
    return env.quantize()


def _read_only_parent(env: Env) -> list[str]:
    env.out = env.mount_tmpfs("ro,size=1m") / "out"
    return env.quantize()


def _full_disk(env: Env) -> list[str]:
    env.out = env.mount_tmpfs("size=1m") / "out"
    return env.quantize()


def _locked_out(env: Env) -> list[str]:
    lock = output_lock(env.out)  # stands for another process: flock conflicts across open files in one process
    lock.__enter__()
    env.cleanups.append(lambda: lock.__exit__(None, None, None))
    return env.quantize()


def _recipe_file(env: Env) -> list[str]:
    recipe = env.input_file("recipe.yaml", "recipe: rtn\nsheme: w4g128\n")
    return env.quantize("--config", recipe)


def _interrupted(env: Env) -> list[str]:
    """A gptq run stopped (as by Ctrl-C) after block 0 was checkpointed; returns the args that ran it."""
    from lowbit.engine.workdir import GroupCheckpoint

    args = env.calibrate(env.text)
    original = GroupCheckpoint.save_block

    def save_block(checkpoint, index, *rest, **kwargs):
        original(checkpoint, index, *rest, **kwargs)
        raise KeyboardInterrupt

    env.monkeypatch.setattr(GroupCheckpoint, "save_block", save_block)
    assert main(args) == 130
    env.monkeypatch.setattr(GroupCheckpoint, "save_block", original)
    return args


def _nan_loss(env: Env) -> list[str]:
    """Every SignRound step's block loss is NaN (a numerical blow-up, injected)."""
    import lowbit.methods.signround.tune as signround_opt

    real = signround_opt.block_mse
    env.monkeypatch.setattr(signround_opt, "block_mse", lambda *a, **k: real(*a, **k) * float("nan"))
    return env.quantize("--recipe", "signround", "--opt", "signround.iters=3", "--dataset", env.text,
                        "--nsamples", 2, "--seqlen", 32)  # fmt: skip


def _with_config(**changes: object) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        env.edit_config(**changes)
        return env.quantize()

    return build


def _flags(*extra: object) -> Callable[[Env], list[str]]:
    return lambda env: env.quantize(*extra)


def _calibration(name: str, data: bytes | str) -> Callable[[Env], list[str]]:
    return lambda env: env.calibrate(env.input_file(name, data))


# (id, builder, keywords that must all appear in the error line: the problem and the fix)
CASES: list[tuple[str, Callable[[Env], list[str]], tuple[str, ...]]] = [
    ("missing-model-dir", lambda env: env.quantize(model=env.tmp / "nothing-here"), ("no such model directory", "pass an existing directory")),
    ("empty-model-dir", _empty_dir, ("is empty", "save_pretrained")),
    ("no-config", lambda env: _remove(env, "config.json"), ("no config.json", "Hugging Face model directory")),
    ("garbled-config", lambda env: _overwrite(env, "config.json", "{ not json"), ("not valid JSON", "download the model again")),
    ("config-without-architectures", _with_config(architectures=None), ("no 'architectures'", "save_pretrained")),
    ("unknown-model-type", _with_config(model_type="llamalike-9000"), ("not known to transformers", "--trust-remote-code")),
    ("remote-code-auto-map", _with_config(auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"}), ("custom code", "--trust-remote-code")),
    ("unsupported-architecture", _gpt2, ("unsupported architecture 'gpt2'", "ArchSpec")),
    ("truncated-safetensors", _truncate, ("model.safetensors is truncated or corrupt", "download the model again")),
    ("no-weights", lambda env: _remove(env, "model.safetensors"), ("no weights", "download the model again")),
    ("pickle-only-weights", _pickle_only, ("pickle weights (pytorch_model.bin)", "--allow-pickle", "safetensors")),
    ("tokenizer-missing", lambda env: _remove(env, "tokenizer.json", "tokenizer_config.json"), ("no tokenizer files", "copy them")),
    ("nan-in-weights", lambda env: _poison(env, float("nan")), ("model.layers.1.mlp.down_proj.weight", "NaN", "re-download")),
    ("inf-in-weights", lambda env: _poison(env, float("inf")), ("model.layers.1.mlp.down_proj.weight", "Inf", "re-download")),
    ("bits-0", _flags("--scheme", "w0g128"), ("bits=0", "from 1 to 8")),
    ("bits-9", _flags("--scheme", "w9g128"), ("bits=9", "from 1 to 8")),
    ("group-0", _flags("--scheme", "w4g0"), ("group_size=0", "positive group size")),
    ("group-minus-2", _flags("--scheme", "w4g-2"), ("group_size=-2", "-1 for one group per output channel")),
    ("scheme-unparsable", _flags("--scheme", "four-bits"), ("unknown scheme 'four-bits'", "use a preset")),
    ("unknown-stage", _flags("--recipe", "rtm"), ("unknown stage 'rtm'", "did you mean 'rtn'")),
    ("unknown-opt-name", _flags("--opt", "engine.batchsize=4"), ("unknown option 'engine.batchsize'", "did you mean 'batch_size'")),
    ("opt-wrong-type", _flags("--opt", "engine.batch_size=many"), ("engine.batch_size", "expects int", "'many'")),
    ("opt-without-value", _flags("--opt", "engine.batch_size"), ("--opt expects STAGE.NAME=VALUE", "engine.batch_size=4")),
    ("recipe-file-unknown-key", _recipe_file, ("unknown key 'sheme'", "did you mean 'scheme'")),
    ("calibration-empty", _calibration("empty.txt", ""), ("contains no text", "at least two documents")),
    ("calibration-binary", _calibration("blob.txt", bytes(range(256)) * 8), ("not UTF-8", "convert it to UTF-8")),
    ("calibration-too-short", _calibration("short.txt", "one short line.\n\nand another."), ("fewer than nsamples x seqlen", "lower --nsamples")),
    ("jsonl-without-text", _calibration("rows.jsonl", '{"content": "a"}\n{"content": "b"}\n'), ('no string "text" field', 'give every record a "text" field')),
    ("output-exists", _existing_out, ("already exists", "--overwrite")),
    ("output-is-a-file", _out_is_file, ("is a file", "choose another --out")),
    ("output-under-a-file", _out_under_file, ("is a file, not a directory", "choose another --out")),
    ("output-parent-read-only", _read_only_parent, ("not writable", "directory you can write")),
    ("disk-full", _full_disk, ("not enough free space", "free some space")),
    ("output-locked-by-another-run", _locked_out, ("another lowbit run is writing", "wait for it")),
    ("hqq-with-a-w-a-scheme", _flags("--recipe", "hqq", "--format", "fake", "--scheme", "w4a4"), ("stage 'hqq' does not support weight-activation", "weight-only scheme")),
    ("gptq-3-bit", _flags("--format", "gptq", "--scheme", "w3g32"), ("GPTQ v1 cannot hold 3-bit", "--format compressed-tensors")),
    ("w4a4-as-compressed-tensors", _flags("--format", "compressed-tensors", "--scheme", "w4a4"), ("simulation", "--format fake")),
    ("ct-group-does-not-divide", _flags("--format", "compressed-tensors", "--scheme", "w4g128"), ("group size 128 does not divide in_features 64", "re-run with a group size")),
    ("ct-3-bit-without-packing", _flags("--format", "compressed-tensors", "--scheme", "w3g32"), ("packing differs between versions", "--ct-packing dense")),
    ("vllm-cpu-3-bit", _flags("--format", "compressed-tensors", "--target", "vllm-cpu", "--scheme", "w3g32-sym", "--ct-packing", "dense"), ("only 4-bit", "re-run with 4 bits")),
    ("unknown-ct-packing", _flags("--format", "compressed-tensors", "--scheme", "w4g32", "--ct-packing", "tight"), ("unknown ct_packing 'tight'", "dense")),
    ("tp-zero", _flags("--format", "gptq", "--scheme", "w4g32", "--tp", "0"), ("tensor-parallel degree 0", "use 1 or more")),
    ("unknown-format", _flags("--format", "ggml"), ("unknown --format 'ggml'", "available")),
    ("gguf-with-a-non-gguf-scheme", _flags("--format", "gguf", "--scheme", "w4g32"), ("w4g32 is not one", "--scheme gguf:<type>")),
    ("gguf-with-a-w-a-scheme", _flags("--format", "gguf", "--scheme", "w8a8"), ("quantizes activations", "weight-only GGUF scheme")),
    ("gguf-mix-with-a-stage-without-per-linear-types", _flags("--recipe", "desv", "--format", "gguf", "--scheme", "gguf:q4_k_m"), ("stage 'desv'", "per-linear types", "gguf:q4_k")),
    ("gguf-k-quant-on-in-features-64", _flags("--format", "gguf", "--scheme", "gguf:q4_k"), ("in_features 64", "block of 256")),
    ("gguf-act-order", _flags("--recipe", "gptq", "--format", "gguf", "--scheme", "gguf:q4_0", "--opt", "gptq.act_order=true"), ("act-order", "static_groups")),
    ("resume-with-other-seed", lambda env: [*_interrupted(env), "--seed", "7", "--resume"], ("cannot resume", "config.seed", "--overwrite")),
    ("leftover-checkpoints-without-resume", _interrupted, ("interrupted run left its checkpoints", "--resume", "--overwrite")),
    ("resume-without-out", lambda env: env.quantize("--resume", out=False), ("--resume", "same --out")),
    ("nan-loss-during-tuning", _nan_loss, ("NaN/Inf at every step of block 0", "lower --opt signround.lr")),
    ("option-exceeds-model-depth", _flags("--recipe", "awq+invarexplore+rtn", "--opt", "invarexplore.monitored_layers=5"), ("monitored_layers=5 exceeds the model's 2 decoder layers", "=2 or fewer")),
    ("option-exceeds-calibration", _flags("--recipe", "signround", "--opt", "signround.best_select=holdout", "--nsamples", "8", "--opt", "signround.holdout=8"), ("holdout < nsamples (8)", "raise --nsamples")),
    ("eval-pickle-only", lambda env: ["eval", *_pickle_only(env)[1:2]], ("pickle weights", "--allow-pickle")),
]  # fmt: skip


def _fingerprint(paths: list[Path]) -> dict[str, str]:
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture
def env(tmp_path, tiny_llama_dir, text_file, monkeypatch) -> Iterator[Env]:
    model = shutil.copytree(tiny_llama_dir, tmp_path / "model")
    state = Env(tmp_path, model, text_file, tmp_path / "out", monkeypatch, inputs=[model, text_file])
    yield state
    for cleanup in reversed(state.cleanups):
        cleanup()


@pytest.mark.parametrize(("builder", "keywords"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_refused_cleanly(env, capsys, builder, keywords):
    args = builder(env)
    existed = env.out.exists()
    before = _fingerprint(env.inputs)
    siblings = set(env.out.parent.iterdir()) if env.out.parent.is_dir() else set()
    capsys.readouterr()

    code = main(args)

    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(errors) == 1, err
    for keyword in keywords:
        assert keyword in errors[0], f"{keyword!r} not in {errors[0]!r}"
    assert "Traceback" not in err
    assert env.out.exists() == existed
    if env.out.parent.is_dir():
        assert set(env.out.parent.iterdir()) == siblings  # no partial, lock or work directory left next to it
    assert _fingerprint(env.inputs) == before


def test_battery_size():
    assert len(CASES) >= 30
    assert len({case[0] for case in CASES}) == len(CASES)


def test_output_that_is_a_file_does_not_suggest_overwrite(env, capsys):
    main(_out_is_file(env))
    assert "--overwrite" not in capsys.readouterr().err


def test_ct_g128_on_in_features_576_is_refused_before_any_forward(tmp_path, monkeypatch, capsys):
    """The issue's example: SmolLM2's hidden size 576 with compressed-tensors g128 fails in seconds."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=576,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=128,
    )
    path = save_model_dir(tmp_path / "smol-shaped", LlamaForCausalLM(config).eval(), make_tokenizer())

    def forbidden(*_args, **_kwargs):
        raise AssertionError("the model ran a forward pass before the export was refused")

    monkeypatch.setattr(LlamaForCausalLM, "forward", forbidden)
    monkeypatch.setattr("lowbit.run.run_quantization", forbidden)
    started = time.perf_counter()
    args = ["quantize", path, "--recipe", "gptq", "--dataset", "builtin", "--format", "compressed-tensors",
            "--scheme", "w4g128", "--out", tmp_path / "out"]  # fmt: skip
    assert main([str(a) for a in args]) == 2
    assert time.perf_counter() - started < 15
    err = capsys.readouterr().err
    assert "group size 128 does not divide in_features 576" in err
    assert "64" in err.split("re-run with a group size")[1]  # the hint names group sizes that work
    assert not (tmp_path / "out").exists()
