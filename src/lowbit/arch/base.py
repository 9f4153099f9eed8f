"""ArchSpec: a declarative description of one model family, so no method guesses structure."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.arch.moe import ExpertsSpec, expert_count, linearize_experts
from lowbit.errors import LowbitError


@dataclass(frozen=True)
class ScaleGroup:
    """An equivalence pair: per-channel scales on `linears`' inputs are absorbed exactly by `prev`.

    `prev` is a norm (its weight, and bias if any, divide by s) or a linear (its output rows divide by s).
    `needs_same_shape` marks v->o: under grouped-query attention v's output is narrower than o's input, so the
    group does not apply.
    """

    prev: str
    linears: tuple[str, ...]
    prev_kind: str  # "norm" | "linear"
    inspect: str  # module whose output measures the effect of the scales (AWQ's loss module)
    needs_same_shape: bool = False
    in_paper_teq: bool = True  # one of TEQ's Table-9 groups
    key: str | None = None  # linear whose input statistics initialise OmniQuant's LET scale (None: the first)
    # the part of a fused previous linear whose rows absorb the scales ("v" of qkv_proj, "up" of gate_up_proj);
    # None: all of prev's output rows. Resolved by `ArchSpec.prev_rows`.
    prev_part: str | None = None

    @property
    def key_linear(self) -> str:
        """The pair's *key* linear (docs/methods.md, OmniQuant): q_proj, o_proj/out_proj, up_proj/fc1."""
        return self.key or self.linears[0]

    def applies_to(self, block: nn.Module, rows: slice | None = None) -> bool:
        """Whether the pair is exact on this block (v->o only when v's output width equals o's input).

        `rows` is the prev part's row range for a fused prev (`ArchSpec.prev_rows`)."""
        if not self.needs_same_shape:
            return True
        prev = block.get_submodule(self.prev)
        width = prev.weight.shape[0] if rows is None else rows.stop - rows.start
        return all(width == block.get_submodule(n).weight.shape[1] for n in self.linears)


# widths a fused part may name, as functions of the model config (head_dim defaults to hidden / heads)
def _head_dim(config: object) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


PART_WIDTHS = {
    "heads": lambda c: c.num_attention_heads * _head_dim(c),
    "kv_heads": lambda c: (getattr(c, "num_key_value_heads", None) or c.num_attention_heads) * _head_dim(c),
    "intermediate": lambda c: c.intermediate_size,
}


@dataclass(frozen=True)
class FusedLinear:
    """A linear whose output rows stack several projections (Phi-3's qkv_proj = [q; k; v], gate_up_proj =
    [gate; up]). `parts` are (part name, width name in PART_WIDTHS), in row order. It is quantized as one linear
    (serving engines load it as one layer), but scale groups and FFN neurons address its parts' rows."""

    name: str
    parts: tuple[tuple[str, str], ...]

    def rows(self, config: object, part: str) -> slice:
        """The row range of `part` for a model with this config."""
        start = 0
        for name, width in self.parts:
            stop = start + int(PART_WIDTHS[width](config))
            if name == part:
                return slice(start, stop)
            start = stop
        raise LowbitError(f"fused linear {self.name} has no part '{part}' (parts: {[p for p, _ in self.parts]})")


@dataclass(frozen=True)
class FFNNeurons:
    """The FFN neuron structure: neuron j is row j of each `expand` linear and column j of `contract`."""

    expand: tuple[str, ...]  # gate/up (gated) or fc1 (ReLU); a fused gate_up_proj is one name
    contract: str  # down or fc2
    # "swiglu" (silu(gate) * up), "geglu" (gelu_tanh(gate) * up: Gemma), "relu"; with gating, only the linear
    # branch (up) is scale-homogeneous
    activation: str
    fused_parts: tuple[str, ...] = ()  # a single fused expand linear: its parts in row order, e.g. ("gate", "up")


@dataclass(frozen=True)
class ArchSpec:
    """Where the decoder blocks are and what lies inside one block."""

    family: str
    model_types: tuple[str, ...]
    blocks_path: str
    sequential: tuple[tuple[str, ...], ...]  # true-sequential subsets of linears (GPTQ order)
    scale_groups: tuple[ScaleGroup, ...]
    ffn: FFNNeurons
    norms: tuple[str, ...]
    attention: str = "self_attn"  # the block's attention module (W-A schemes quantize its q/k/v operands)
    # how W-A schemes quantize the attention operands (docs/methods.md): "head" per (head, token) over head_dim,
    # q and k after RoPE (LLaMA); "token" per token across all heads, q after its 1/sqrt(d) scaling (OPT)
    attention_operands: str = "head"
    query_key: tuple[str, str] | None = None  # (q_proj, k_proj): OmniQuant's q<->k scaling pair
    rotary: bool = False  # q and k pass through RoPE after the projections (ties q<->k scales, docs/methods.md)
    # q_norm/k_norm act on q and k after the projections (Qwen3, Gemma 3): scaling q rows by 1/s and k rows by s
    # is then NOT an equivalence, so no stage may build the q<->k pair
    qk_norm: bool = False
    # how a norm applies its weight: "plain" (x * w) or "one_plus" (x * (1 + w), Gemma); folding scales s gives
    # w / s or (1 + w) / s - 1 (methods/common/fold.py, OmniQuant's LET)
    norm_kind: str = "plain"
    ffn_norm: str | None = None  # the FFN's input norm (None: norms[1]); Gemma: pre_feedforward_layernorm
    ffn_post_norm: str | None = None  # a norm on the FFN's output before the residual add (Gemma's sandwich)
    final_norm: str = "model.norm"  # the norm before lm_head (InvarExplore's head)
    fused: tuple[FusedLinear, ...] = ()  # linears whose rows stack several projections (Phi-3)
    # the family is far out of distribution without a leading BOS (Gemma): calibration and perplexity windows
    # then start with the tokenizer's BOS (data.py, eval/perplexity.py); other families keep the GPTQ protocol
    window_bos: bool = False
    # sparse mixture-of-experts blocks (Qwen3-MoE): the fused experts become per-expert linears (arch/moe.py), which
    # replace the dense FFN linears of `sequential` in a sparse block; the router stays float
    experts: ExpertsSpec | None = None

    @property
    def linear_names(self) -> tuple[str, ...]:
        """Every quantized linear of a dense block, in true-sequential order (`linear_names_for`: of a given block)."""
        return tuple(name for subset in self.sequential for name in subset)

    def expert_count(self, block: nn.Module) -> int:
        """The number of experts of `block` (0: a dense block, or a dense family)."""
        return expert_count(block, self.experts) if self.experts else 0

    def prepare_block(self, block: nn.Module) -> None:
        """Present the block in the form every stage works on: fused experts become per-expert linears (once,
        exact); a no-op for dense blocks."""
        if self.experts:
            linearize_experts(block, self.experts)

    def prepare(self, model: nn.Module) -> nn.Module:
        """`prepare_block` on every decoder block of `model` (in place); returns the model."""
        for block in self.blocks(model):
            self.prepare_block(block)
        return model

    def _dense_ffn(self) -> set[str]:
        return {*self.ffn.expand, self.ffn.contract}

    def sequential_for(self, block: nn.Module) -> tuple[tuple[str, ...], ...]:
        """The true-sequential subsets of this block: `sequential`, with a sparse block's FFN subsets replaced by
        the per-expert subsets (each covering every expert) and the shared expert's."""
        count = self.expert_count(block)
        if not count:
            return self.sequential
        spec, dense = self.experts, self._dense_ffn()
        experts = tuple(
            tuple(f"{spec.path}.{index}.{name}" for index in range(count) for name in subset)
            for subset in spec.sequential
        )
        subsets: list[tuple[str, ...]] = []
        for subset in self.sequential:
            if not dense.intersection(subset):
                subsets.append(subset)
            elif experts:
                subsets.extend((*experts, *spec.shared))
                experts = ()
        return tuple(subsets)

    def linear_names_for(self, block: nn.Module) -> tuple[str, ...]:
        """Every quantized linear of this block (per-expert names in a sparse block), in true-sequential order."""
        return tuple(name for subset in self.sequential_for(block) for name in subset)

    def expert_linear_names(self, block: nn.Module) -> tuple[str, ...]:
        """The per-expert linears of a sparse block, all experts (empty for a dense block)."""
        if not self.expert_count(block):
            return ()
        prefix = f"{self.experts.path}."
        return tuple(name for name in self.linear_names_for(block) if name.startswith(prefix))

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The decoder blocks of `model`."""
        return model.get_submodule(self.blocks_path)

    def block_name(self, index: int) -> str:
        """Full module name of block `index` (prefix of its linears' names in the model)."""
        return f"{self.blocks_path}.{index}"

    def linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        """The block's linears by relative name, in true-sequential order; checks the block really has them.

        A sparse block's fused experts are presented as per-expert linears first (`prepare_block`)."""
        self.prepare_block(block)
        found = {}
        for name in self.linear_names_for(block):
            try:
                module = block.get_submodule(name)
            except AttributeError as error:
                raise LowbitError(
                    f"block has no '{name}' although its config says family '{self.family}'; this checkpoint's "
                    "layout is not supported: open an issue with its config.json"
                ) from error
            if not isinstance(module, nn.Linear):
                raise LowbitError(f"'{name}' is a {type(module).__name__}, not nn.Linear; load a float checkpoint")
            found[name] = module
        return found

    @property
    def norm_offset(self) -> float:
        """The constant added to a norm's weight before it scales: 0 (plain) or 1 (Gemma's 1 + w)."""
        if self.norm_kind not in ("plain", "one_plus"):
            raise LowbitError(f"ArchSpec {self.family} has norm_kind={self.norm_kind!r}: use plain or one_plus")
        return 1.0 if self.norm_kind == "one_plus" else 0.0

    @property
    def query_key_scalable(self) -> bool:
        """Whether OmniQuant's q<->k scaling is an exact equivalence for this family."""
        return self.query_key is not None and not self.qk_norm

    @property
    def ffn_input_norm(self) -> str:
        return self.ffn_norm or self.norms[1]

    def fused_linear(self, name: str) -> FusedLinear | None:
        return next((f for f in self.fused if f.name == name), None)

    def prev_rows(self, block: nn.Module, group: ScaleGroup) -> slice | None:
        """The rows of a fused prev linear that absorb the group's scales (None: all of prev's rows)."""
        if group.prev_part is None:
            return None
        fused = self.fused_linear(group.prev)
        if fused is None:
            raise LowbitError(
                f"ArchSpec {self.family}: scale group {group.prev} names part {group.prev_part!r} "
                "but lists no FusedLinear for it"
            )
        return fused.rows(block_config(block), group.prev_part)

    def groups_for(self, block: nn.Module) -> list[ScaleGroup]:
        """The scale groups that are exact on this block (a sparse block has none over the dense FFN linears)."""
        groups = self.scale_groups
        if self.expert_count(block):
            dense = self._dense_ffn()
            groups = tuple(g for g in groups if g.prev not in dense and not dense.intersection(g.linears))
        return [group for group in groups if group.applies_to(block, self.prev_rows(block, group))]


def block_config(block: nn.Module) -> object:
    """The model config a decoder block (or one of its submodules) holds, for resolving fused part widths."""
    for module in block.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "hidden_size"):
            return config
    raise LowbitError("the decoder block holds no config: cannot resolve the rows of its fused linears")
