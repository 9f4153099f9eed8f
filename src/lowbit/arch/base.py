"""ArchSpec: a declarative description of one model family, so no method guesses structure."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

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

    @property
    def key_linear(self) -> str:
        """The pair's *key* linear (omniquant.md §2): q_proj, o_proj/out_proj, up_proj/fc1."""
        return self.key or self.linears[0]

    def applies_to(self, block: nn.Module) -> bool:
        """Whether the pair is exact on this block (v->o only when v's output width equals o's input)."""
        if not self.needs_same_shape:
            return True
        prev = block.get_submodule(self.prev)
        return all(prev.weight.shape == block.get_submodule(n).weight.shape for n in self.linears)


@dataclass(frozen=True)
class FFNNeurons:
    """The FFN neuron structure: neuron j is row j of each `expand` linear and column j of `contract`."""

    expand: tuple[str, ...]  # gate/up (SwiGLU) or fc1 (ReLU)
    contract: str  # down or fc2
    activation: str  # "swiglu" | "relu"


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
    # how W-A schemes quantize the attention operands (omniquant.md §7): "head" per (head, token) over head_dim,
    # q and k after RoPE (LLaMA); "token" per token across all heads, q after its 1/sqrt(d) scaling (OPT)
    attention_operands: str = "head"
    query_key: tuple[str, str] | None = None  # (q_proj, k_proj): OmniQuant's q<->k scaling pair
    rotary: bool = False  # q and k pass through RoPE after the projections (ties q<->k scales, omniquant.md §4)

    @property
    def linear_names(self) -> tuple[str, ...]:
        """Every quantized linear of a block, in true-sequential order."""
        return tuple(name for subset in self.sequential for name in subset)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The decoder blocks of `model`."""
        return model.get_submodule(self.blocks_path)

    def block_name(self, index: int) -> str:
        """Full module name of block `index` (prefix of its linears' names in the model)."""
        return f"{self.blocks_path}.{index}"

    def linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        """The block's linears by relative name, in true-sequential order; checks the block really has them."""
        found = {}
        for name in self.linear_names:
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

    def groups_for(self, block: nn.Module) -> list[ScaleGroup]:
        """The scale groups that are exact on this block."""
        return [group for group in self.scale_groups if group.applies_to(block)]
