"""InvarExplore's invariance transforms as pure functions (see docs/methods.md, InvarExplore).

Convention of the reference code: W1' = P·S⁻¹·Rᵀ·W1 and W2' = W2·R·S·Pᵀ. A layer's state is a permutation
π (position p holds source neuron π[p]), scales s and angles θ, both indexed by *source* neuron (pair i = neurons
2i, 2i+1), all relative to the teacher's weights. Rotations are applied element-wise on the touched pairs, never as a
dense matrix, so a candidate costs O(|T|·d) and rebuilding any subset of rows gives, bit for bit, the same rows as
rebuilding the whole matrix (the identity state reproduces the teacher exactly).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.arch import FFNNeurons
from lowbit.errors import LowbitError
from lowbit.quantizer import fake_quant
from lowbit.scheme import QuantScheme


@dataclass
class LayerState:
    """One FFN layer's invariance state, relative to the teacher (fp32 scales and angles, int64 permutation)."""

    perm: Tensor
    scale: Tensor
    angle: Tensor

    @classmethod
    def identity(cls, n: int) -> LayerState:
        """No permutation, unit scales, zero angles: the teacher itself."""
        return cls(torch.arange(n), torch.ones(n), torch.zeros(n // 2))

    def clone(self) -> LayerState:
        return LayerState(self.perm.clone(), self.scale.clone(), self.angle.clone())

    def is_identity(self) -> bool:
        n = self.perm.numel()
        return bool(
            torch.equal(self.perm, torch.arange(n)) and bool((self.scale == 1).all()) and bool((self.angle == 0).all())
        )

    def check(self, n: int, where: str) -> None:
        """Shapes, dtypes and a true permutation, or a LowbitError naming the layer."""
        if self.perm.shape != (n,) or self.scale.shape != (n,) or self.angle.shape != (n // 2,):
            raise LowbitError(
                f"invariance record for {where} has shapes perm {tuple(self.perm.shape)}, scale "
                f"{tuple(self.scale.shape)}, angle {tuple(self.angle.shape)}; this model needs [{n}], [{n}], "
                f"[{n // 2}]: resume from a record of the same model"
            )
        if not torch.equal(torch.sort(self.perm.long()).values, torch.arange(n)):
            raise LowbitError(f"invariance record for {where}: perm is not a permutation of 0..{n - 1}")


@dataclass(frozen=True)
class NeuronRoles:
    """How the FFN linears move with a neuron: rows of each expand linear, columns of the contract linear.

    `expand` holds (linear, scaled, rotated). On SwiGLU only up is scaled (silu is not homogeneous) and gate is
    rotated only with rotation_target "gate_up_down"; OPT's fc1 takes all three.
    """

    expand: tuple[tuple[str, bool, bool], ...]
    contract: str

    @property
    def linears(self) -> tuple[str, ...]:
        return (*(name for name, _, _ in self.expand), self.contract)


def neuron_roles(ffn: FFNNeurons, rotation_target: str = "up_down") -> NeuronRoles:
    """The roles of an ArchSpec's FFN linears (ReLU FFNs as in the paper; SwiGLU as the reference code extends it)."""
    if ffn.fused_parts:
        raise LowbitError(
            "InvarExplore does not support a fused gate_up_proj (Phi-3) yet: its neurons span row slices of one "
            "linear. Use awq, teq or omniquant for this family"
        )
    if ffn.activation in ("swiglu", "geglu"):  # gelu_tanh(gate) * up: like SwiGLU only up is homogeneous
        gate, up = ffn.expand
        return NeuronRoles(((gate, False, rotation_target == "gate_up_down"), (up, True, True)), ffn.contract)
    if ffn.activation == "relu" and len(ffn.expand) == 1:
        return NeuronRoles(((ffn.expand[0], True, True),), ffn.contract)
    raise LowbitError(f"InvarExplore supports ReLU, SwiGLU and GeGLU FFNs, not '{ffn.activation}'")


def rotated_rows(w: Tensor, angle: Tensor, sources: Tensor) -> Tensor:
    """Rows `sources` of Rᵀ·w (w: [n, ...] or a bias [n]), element-wise: row i = cos θ·w[i] ± sin θ·w[i xor 1].

    The sign is + for even i, − for odd i (Rᵀ's 2x2 block [[c, s], [−s, c]]); an unpaired last neuron (odd n)
    is left alone.
    """
    if angle.numel() == 0:
        return w[sources].float()
    paired = sources < 2 * angle.numel()
    pair = torch.where(paired, sources // 2, 0)
    partner = torch.where(paired, sources ^ 1, sources)
    theta = torch.where(paired, angle[pair], 0.0)
    c, t = torch.cos(theta), torch.sin(theta)
    t = torch.where(sources % 2 == 0, t, -t)
    shape = (-1,) + (1,) * (w.dim() - 1)
    return c.reshape(shape) * w[sources].float() + t.reshape(shape) * w[partner].float()


def transformed_rows(w: Tensor, state: LayerState, positions: Tensor, *, scaled: bool, rotated: bool) -> Tensor:
    """Rows `positions` of P·S⁻¹·Rᵀ·w (fp32) for an expand linear's weight [n, d] or bias [n]."""
    sources = state.perm[positions]
    rows = rotated_rows(w, state.angle, sources) if rotated else w[sources].float()
    if scaled:
        rows = rows / state.scale[sources].reshape((-1,) + (1,) * (w.dim() - 1))
    return rows


def transformed_columns(w: Tensor, state: LayerState, positions: Tensor) -> Tensor:
    """Columns `positions` of W2·R·S·Pᵀ (fp32, [d, len(positions)]) for the contract linear's weight [d, n]."""
    sources = state.perm[positions]
    cols = rotated_rows(w.t(), state.angle, sources) * state.scale[sources][:, None]
    return cols.t()


def dense_rotation(angle: Tensor, n: int) -> Tensor:
    """The block-diagonal R of Eq. 20 as a dense [n, n] fp64 matrix (tests and the dense reference only)."""
    r = torch.eye(n, dtype=torch.float64)
    c, s = torch.cos(angle.double()), torch.sin(angle.double())
    even = torch.arange(angle.numel()) * 2
    r[even, even], r[even, even + 1], r[even + 1, even], r[even + 1, even + 1] = c, -s, s, c
    return r


def dense_transform(up: Tensor, down: Tensor, state: LayerState) -> tuple[Tensor, Tensor]:
    """P·S⁻¹·Rᵀ·W1 and W2·R·S·Pᵀ with dense matrices in fp64: the reference's construction (tests only)."""
    n = up.shape[0]
    r = dense_rotation(state.angle, n)
    p = torch.eye(n, dtype=torch.float64)[state.perm]
    s = torch.diag(state.scale.double())
    return p @ torch.linalg.inv(s) @ r.t() @ up.double(), down.double() @ r @ s @ p.t()


@dataclass(frozen=True)
class ProposalConfig:
    """The reference's proposal distribution, with each invariance switchable (the ablation)."""

    swap_frac: float = 0.1
    sigma_scale: float = 1e-2
    sigma_rot: float = 1e-5
    permute: bool = True
    scale: bool = True
    rotate: bool = True

    def pairs_touched(self, n: int) -> int:
        """k // 2 pairs with k = round(n · swap_frac)."""
        return min(round(n * self.swap_frac) // 2, n // 2)


def propose(state: LayerState, generator: torch.Generator, config: ProposalConfig) -> tuple[LayerState, Tensor]:
    """A new state and the touched neurons T (shuffled): θ_j += N(0, σ_rot²) on the pairs J, s_i += N(0, σ_s²) on
    T, and π cycled over the positions T (position T[q] takes the old value at T[q−1]).

    Every random number is drawn whichever invariances are on, so ablations see the same layers and sets T.
    """
    n = state.perm.numel()
    count = config.pairs_touched(n)
    if count < 1:
        raise LowbitError(f"swap_frac={config.swap_frac} touches no neuron pair of a {n}-neuron FFN: raise it")
    pairs = torch.randperm(n // 2, generator=generator)[:count]
    touched = torch.stack([2 * pairs, 2 * pairs + 1], dim=1).reshape(-1)
    touched = touched[torch.randperm(touched.numel(), generator=generator)]
    d_angle = torch.randn(count, generator=generator) * config.sigma_rot
    d_scale = torch.randn(touched.numel(), generator=generator) * config.sigma_scale
    new = state.clone()
    if config.rotate:
        new.angle[pairs] += d_angle
    if config.scale:
        new.scale[touched] += d_scale
    if config.permute:
        new.perm[touched] = state.perm[touched.roll(1)]
    return new, touched


def changed_positions(perm: Tensor, touched: Tensor) -> Tensor:
    """Positions whose row can change: C = T ∪ {p : π(p) ∈ T}, sorted (θ and s are by source, π by position)."""
    mask = torch.isin(perm, touched)
    mask[touched] = True
    return mask.nonzero().flatten()


def group_columns(positions: Tensor, n: int, scheme: QuantScheme) -> Tensor:
    """Every column of the quantization groups that contain `positions` (sorted, whole groups).

    Re-quantizing these columns alone equals re-quantizing the whole matrix: qparams are per (row, group) and a
    gathered set of whole groups keeps its group boundaries (a partial last group stays last).
    """
    width = scheme.group_width(n)
    if width >= n:
        return torch.arange(n)
    groups = torch.unique(positions // width)
    cols = (groups[:, None] * width + torch.arange(width)).flatten()
    return cols[cols < n]


def monitored_layers(depth: int, count: int) -> list[int]:
    """The reference's dilated subset: L − 1 − ⌈i·L/count⌉ for i < count, ascending."""
    if count > depth:
        raise LowbitError(
            f"invarexplore.monitored_layers={count} exceeds the model's {depth} decoder layers: "
            f"set --opt invarexplore.monitored_layers={depth} or fewer"
        )
    return sorted(depth - 1 - (-(-i * depth // count)) for i in range(count))


def quantize_rows(w: Tensor, scheme: QuantScheme, dtype: torch.dtype) -> Tensor:
    """RTN fake-quant (fp32) of `w` cast to the model dtype: what the final rtn stage computes on the folded weight."""
    with torch.no_grad():
        return fake_quant(w.to(dtype), scheme, ste="identity")


Quantize = Callable[[Tensor], Tensor]


def build_candidate(
    teacher: dict[str, Tensor],
    teacher_bias: dict[str, Tensor],
    current: dict[str, Tensor],
    current_bias: dict[str, Tensor],
    state: LayerState,
    touched: Tensor | None,
    roles: NeuronRoles,
    quantize: Quantize,
    scheme: QuantScheme,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The student's FFN weights (dequantized) and float biases for `state`.

    `touched=None` rebuilds and re-quantizes every row and column (the full path, and the fold); otherwise only
    the changed rows of the expand linears and the changed groups of the contract linear are rebuilt and
    re-quantized into copies of `current`. Both give the same tensors, bit for bit.
    """
    n = state.perm.numel()
    full = touched is None
    rows = torch.arange(n) if full else changed_positions(state.perm, touched)
    weights, biases = {}, {}
    for name, scaled, rotated in roles.expand:
        q = quantize(transformed_rows(teacher[name], state, rows, scaled=scaled, rotated=rotated))
        q = q.to(teacher[name].dtype)
        weights[name] = q if full else current[name].clone().index_copy_(0, rows, q)
        if name in teacher_bias:
            b = transformed_rows(teacher_bias[name], state, rows, scaled=scaled, rotated=rotated)
            b = b.to(teacher_bias[name].dtype)
            biases[name] = b if full else current_bias[name].clone().index_copy_(0, rows, b)
    cols = torch.arange(n) if full else group_columns(rows, n, scheme)
    q = quantize(transformed_columns(teacher[roles.contract], state, cols)).to(teacher[roles.contract].dtype)
    weights[roles.contract] = q if full else current[roles.contract].clone().index_copy_(1, cols, q)
    return weights, biases


def fold_weights(
    teacher: dict[str, Tensor], teacher_bias: dict[str, Tensor], state: LayerState, roles: NeuronRoles
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The teacher's FFN weights and biases with the state folded in (float, the teacher's dtypes)."""
    everything = torch.arange(state.perm.numel())
    weights, biases = {}, {}
    for name, scaled, rotated in roles.expand:
        weights[name] = transformed_rows(teacher[name], state, everything, scaled=scaled, rotated=rotated)
        if name in teacher_bias:
            biases[name] = transformed_rows(teacher_bias[name], state, everything, scaled=scaled, rotated=rotated)
    weights[roles.contract] = transformed_columns(teacher[roles.contract], state, everything)
    weights = {name: w.to(teacher[name].dtype) for name, w in weights.items()}
    return weights, {name: b.to(teacher_bias[name].dtype) for name, b in biases.items()}
