"""GPTQ's pure math (see docs/methods.md, GPTQ): the running Hessian and the column-wise solver for one layer.

Everything here is a plain tensor function with no model or engine in sight, so it can be tested exactly
and reused (TEQ+GPTQ, AWQ+GPTQ and InvarExplore+GPTQ all end in `gptq_quantize`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.methods.common.gram import gram_matrix
from lowbit.quantizer import QuantizedWeight, compute_qparams, decode, quantize_codes, quantize_weight
from lowbit.scheme import ACT_BITS_OFF, QuantScheme

log = logging.getLogger(__name__)

DAMP_STEP = 0.01
DAMP_MAX = 1.0
MSE_GRID = 100
MSE_MAX_SHRINK = 0.8
MSE_NORM = 2.4


def input_gram(x: Tensor, exact: bool = False) -> tuple[Tensor, int]:
    """(X^T X over every token of a batch of layer inputs [batch, ..., k], sequences in the batch).

    A 2-D input counts as one sequence per row. Linears fed the same tensor (q/k/v, gate/up) can share it. fp32 by
    default. With `exact`, an fp64 sum that does not depend on how the sequences were batched or split over ranks
    (what a data-parallel run needs to solve one process's H): each sequence's own fp32 product, always computed
    alone, added in fp64; rows of a 2-D input (tokens routed to an MoE expert) are multiplied in fp64, where a
    product of two fp32 values is exact.
    """
    n = x.shape[0] if x.dim() > 2 else 1 if x.dim() == 1 else x.shape[0]
    if not exact:
        return gram_matrix(x.reshape(-1, x.shape[-1]).to(torch.float32)), n
    if x.dim() <= 2:
        return gram_matrix(x.reshape(-1, x.shape[-1]).to(torch.float64)), n
    sequences = x.reshape(x.shape[0], -1, x.shape[-1])
    total = gram_matrix(sequences[0].to(torch.float32)).double()
    for sequence in sequences[1:]:
        total += gram_matrix(sequence.to(torch.float32))
    return total, n


class HessianAccumulator:
    """H = (2/N) * sum_t x_t^T x_t over N sequences, accumulated batch by batch.

    By default in fp32 as the reference: each batch rescales the old H by N/(N + n) and adds its Gram matrix times
    2/N_new, as `GPTQ.add_batch` (which scales the rows by sqrt(2/N_new) first), so the damping (relative to
    mean(diag H)) behaves identically. With `exact`, the Gram matrices (fp64, `input_gram(exact=True)`) are summed
    in fp64 and normalized once when H is read: the sum no longer depends on the batch order or split, so N ranks
    reduce to the H of one process up to fp64 rounding.
    """

    def __init__(self, columns: int, device: torch.device | str = "cpu", exact: bool = False) -> None:
        self.exact = exact
        dtype = torch.float64 if exact else torch.float32
        self.sum = torch.zeros(columns, columns, dtype=dtype, device=device)  # the running H, or the fp64 Gram sum
        self.nsamples = 0
        self.tokens = 0  # rows (tokens) seen, counted by the caller: an MoE expert may see none

    @property
    def H(self) -> Tensor:
        """The fp32 Hessian the solver takes."""
        if not self.exact:
            return self.sum
        return (self.sum * (2.0 / max(self.nsamples, 1))).to(torch.float32)

    def add_batch(self, x: Tensor) -> None:
        """Add one batch of layer inputs [batch, ..., k]; a 2-D input counts as one sequence per row."""
        self.add_gram(*input_gram(x, self.exact))

    def add_gram(self, gram: Tensor, n: int) -> None:
        """Add a batch given as its Gram matrix X^T X and its number of sequences `n`."""
        if self.exact:
            self.nsamples += n
            self.sum.add_(gram.to(self.sum.device, torch.float64))
            return
        self.sum *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        self.sum.add_(gram.to(self.sum.device), alpha=2.0 / self.nsamples)


@dataclass
class GPTQResult:
    """One layer quantized by GPTQ: the export record plus what the run record needs to know."""

    record: QuantizedWeight
    weight: Tensor  # the fake-quant weight the column loop produced (original column order), fp32
    loss: float  # sum over columns of (w - q)^2 / d^2 / 2, the reference's error term
    percdamp: float  # the damping that finally succeeded (relative to mean diag H)
    retries: int
    fallback_rtn: bool
    dead_columns: int
    notes: list[str] = field(default_factory=list)


def fit_qparams(w: Tensor, scheme: QuantScheme, mse: bool = False) -> tuple[Tensor, Tensor]:
    """qparams of a slice of W treated as one group per row; with `mse`, the reference's shrink-grid search.

    The grid (docs/methods.md) tries p = 1 - i/100 for i < 80 as gamma_hi = gamma_lo = p and keeps, per row,
    the p with the smallest sum |Q(w) - w|^2.4.
    """
    one_group = dataclasses.replace(scheme, group_size=-1, act_bits=ACT_BITS_OFF)  # keeps the grid rules (GGUF)
    scale, zero = compute_qparams(w, one_group, zero_grad="none")
    if not mse:
        return scale, zero
    best = torch.full((w.shape[0], 1), float("inf"))
    for i in range(int(MSE_MAX_SHRINK * MSE_GRID)):
        p = torch.full((w.shape[0], 1), 1 - i / MSE_GRID)
        s1, z1 = compute_qparams(w, one_group, gamma_hi=p, gamma_lo=p, zero_grad="none")
        q = decode(quantize_codes(w, s1, z1, one_group), s1, z1, one_group)
        err = (q - w).abs().pow(MSE_NORM).sum(dim=1, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        scale, zero = torch.where(better, s1, scale), torch.where(better, z1, zero)
    return scale, zero


def group_qparams(w: Tensor, scheme: QuantScheme, g: int, mse: bool = False) -> list[tuple[Tensor, Tensor]]:
    """qparams of each g-column group of the slice `w`: one fit per group, or, for a double-quantized scheme (GGUF
    K-quants, whose group scales share one fp16 d per super-block), one fit of the whole slice on its grid. `mse`
    (the shrink search) applies to per-group fits only."""
    if scheme.double_quant is None:
        return [fit_qparams(w[:, i : i + g], scheme, mse) for i in range(0, w.shape[1], g)]
    scale, zero = compute_qparams(w, scheme, zero_grad="none")
    return [(scale[:, j : j + 1], zero[:, j : j + 1]) for j in range(scale.shape[1])]


def _inverse_factor(H: Tensor, percdamp: float) -> Tensor | None:
    """U with H_damped^-1 = U^T U, or None when H is not positive definite after damping."""
    damp = percdamp * torch.mean(torch.diag(H))
    Hd = H.clone()
    Hd.diagonal().add_(damp)
    # each k x k intermediate is dropped as soon as the next exists: at most two live beside H (a 7B down_proj's
    # is 485 MB, and this solve is a streamed GPTQ run's peak)
    L, info = torch.linalg.cholesky_ex(Hd)
    del Hd
    if int(info) != 0:
        return None
    Hinv = torch.cholesky_inverse(L)
    del L
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    del Hinv
    if int(info) != 0 or not bool(torch.isfinite(U).all()):
        return None
    return U


def _g_idx(k: int, g: int, perm: Tensor | None, static_groups: bool) -> Tensor:
    """Column -> group map: i // g, or g_idx[perm[j]] = j // g for act-order without static groups."""
    order = torch.arange(k, dtype=torch.int32) // g
    if perm is None or static_groups:
        return order
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = order
    return g_idx


def _column_loop(
    W: Tensor,
    U: Tensor,
    scheme: QuantScheme,
    g: int,
    block_size: int,
    perm: Tensor | None,
    static: list[tuple[Tensor, Tensor]] | None,
    row_params: tuple[Tensor, Tensor] | None,
    mse: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
    """GPTQ's lazy-batch loop on permuted W (modified in place). Returns codes, scale, zero (per group in the
    order qparams were fitted), the fake-quant weight (permuted order) and the loss."""
    m, k = W.shape
    codes = torch.zeros(m, k, dtype=torch.float32)
    Q = torch.zeros(m, k, dtype=torch.float32)
    scales = torch.zeros(m, -(-k // g), dtype=torch.float32)
    zeros = torch.zeros_like(scales)
    scale = zero = None
    if row_params is not None:
        scale, zero = row_params
        scales[:], zeros[:] = scale, zero
    if static is not None:
        for group, (s, z) in enumerate(static):
            scales[:, group : group + 1], zeros[:, group : group + 1] = s, z
    loss = torch.zeros((), dtype=torch.float64)
    fit = g * scheme.double_quant[0] if scheme.double_quant is not None else g  # columns fitted together
    fitted: list[tuple[Tensor, Tensor]] = []
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        E = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = i1 + j
            if row_params is None:
                if static is not None:
                    scale, zero = static[(int(perm[col]) if perm is not None else col) // g]
                elif col % g == 0:
                    # Fitted on W as of this lazy batch's start, as in the reference (identical when g == B); a
                    # K-quant super-block's groups are fitted together when the loop reaches its first column.
                    if col % fit == 0:
                        fitted = group_qparams(W[:, col : col + fit], scheme, g, mse)
                    scale, zero = fitted[(col % fit) // g]
                    scales[:, col // g : col // g + 1], zeros[:, col // g : col // g + 1] = scale, zero
            w = W1[:, j : j + 1]
            d = U1[j, j]
            c = quantize_codes(w, scale, zero, scheme)
            q = decode(c, scale, zero, scheme)
            codes[:, col : col + 1], Q[:, col : col + 1] = c, q
            e = (w - q) / d
            loss += e.square().sum() / 2
            W1[:, j:] -= e * U1[j : j + 1, j:]
            E[:, j : j + 1] = e
        W[:, i2:] -= E @ U[i1:i2, i2:]
    return codes, scales, zeros, Q, float(loss)


def gptq_quantize(
    weight: Tensor,
    H: Tensor,
    scheme: QuantScheme,
    *,
    percdamp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    mse: bool = False,
    consume_h: bool = False,
) -> GPTQResult:
    """Quantize one linear weight [m, k] with its Hessian [k, k]; `weight` is not modified, and `H` is not
    either unless `consume_h` (a caller done with a fp32 CPU H saves its k x k copy; H's values are then undefined).

    Robust by construction: when Cholesky fails or the result is not finite, the damping grows by 0.01 up to
    1.0 and the layer falls back to RTN after that; every retry is logged and returned, never silent.
    """
    if weight.dim() != 2 or H.shape != (weight.shape[1], weight.shape[1]):
        raise LowbitError(f"GPTQ needs W [m, k] and H [k, k]; got {tuple(weight.shape)} and {tuple(H.shape)}")
    if block_size < 1 or percdamp < 0:
        raise LowbitError(f"GPTQ block_size must be >= 1 and percdamp >= 0 (got {block_size}, {percdamp})")
    m, k = weight.shape
    W0 = weight.detach().to("cpu", torch.float32).clone()
    H = H.detach().to("cpu", torch.float32)
    if not consume_h:
        H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W0[:, dead] = 0
    g = scheme.group_width(k)
    row_params = fit_qparams(W0, scheme, mse) if scheme.group_size == -1 else None
    static = None
    if static_groups and row_params is None:
        static = group_qparams(W0, scheme, g, mse)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W0, H = W0[:, perm], H[perm][:, perm]

    notes: list[str] = []
    damp, retries = percdamp, 0
    while True:
        U = _inverse_factor(H, damp)
        if U is not None:
            codes, scale, zero, Q, loss = _column_loop(
                W0.clone(), U, scheme, g, block_size, perm, static, row_params, mse
            )
            if bool(torch.isfinite(Q).all()) and bool(torch.isfinite(scale).all()):
                break
        if damp >= DAMP_MAX - 1e-12:
            notes.append(f"not positive definite up to percdamp {DAMP_MAX}: RTN fallback")
            record = quantize_weight(weight.detach().float(), scheme)
            return GPTQResult(record, record.dequantize(), float("nan"), damp, retries, True, int(dead.sum()), notes)
        damp = min(round(damp + DAMP_STEP, 10), DAMP_MAX)
        retries += 1
    if retries:
        notes.append(f"Hessian needed percdamp {damp:g} after {retries} retries")
    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        codes, Q = codes[:, inv], Q[:, inv]
        if static is None and row_params is None:  # groups consecutive in permuted order: desc_act
            g_idx = _g_idx(k, g, perm, static_groups=False)
    record = QuantizedWeight(
        codes=codes.round().to(torch.uint8),
        scale=scale.to(scheme.torch_scale_dtype),
        zero=zero.to(torch.float32) if scheme.min_offset else zero.round().to(torch.int32),
        scheme=scheme,
        g_idx=g_idx,
    )
    return GPTQResult(record, Q, loss, damp, retries, False, int(dead.sum()), notes)
