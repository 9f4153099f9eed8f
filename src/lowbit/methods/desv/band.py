"""DESV's banded singular-value increment (docs/methods.md, LSI and DESV): pure tensor math, tested on its own.

For W0 = U diag(sigma) Vh (thin SVD, r = min(m, k)) the pre-quantization weight is W0 + U B Vh, with B an r x r
band of 2n+1 diagonals stored as P in R^{(2n+1) x r}: B[i, i+d] = P[d+n, i]. Entries whose column falls outside
[0, r) are invalid and kept at zero by a fixed mask. n = 0 is LSI (a diagonal increment).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError

log = logging.getLogger(__name__)


def band_mask(r: int, n: int, inclusive: bool = True) -> Tensor:
    """[2n+1, r] bool: P[d+n, i] is live when 0 <= i+d < r and |d| <= n (n-1 with inclusive=False, paper Eq. 8)."""
    d = torch.arange(-n, n + 1)[:, None]
    i = torch.arange(r)[None, :]
    reach = n if inclusive else n - 1
    return (i + d >= 0) & (i + d < r) & (d.abs() <= reach)


def live_count(r: int, n: int) -> int:
    """Live parameters of an inclusive band: (2n+1) r - n (n+1)."""
    return (2 * n + 1) * r - n * (n + 1)


@dataclass(frozen=True)
class BandIndex:
    """Index vectors that scatter P's live entries into a dense r x r B (computed once per (r, n))."""

    r: int
    n: int
    mask: Tensor  # [2n+1, r] bool
    p_index: Tensor  # flat indices into P of the live entries
    b_index: Tensor  # flat indices into B where they go

    @classmethod
    def build(cls, r: int, n: int, inclusive: bool = True) -> BandIndex:
        mask = band_mask(r, n, inclusive)
        rows, cols = mask.nonzero(as_tuple=True)  # rows = d + n, cols = i
        i, j = cols, cols + rows - n
        return cls(r, n, mask, rows * r + cols, i * r + j)


def band_matrix(p: Tensor, index: BandIndex) -> Tensor:
    """Dense B [r, r] from P (differentiable; only live entries reach B)."""
    values = p.reshape(-1).index_select(0, index.p_index)
    return p.new_zeros(index.r * index.r).index_put((index.b_index,), values).reshape(index.r, index.r)


def delta_weight(u: Tensor, b: Tensor, vh: Tensor) -> Tensor:
    """U B Vh, multiplying B into the smaller factor first: (U B) Vh when m <= k, else U (B Vh)."""
    if u.shape[0] <= vh.shape[1]:
        return (u @ b) @ vh
    return u @ (b @ vh)


def banded_sum_delta(u: Tensor, p: Tensor, vh: Tensor, index: BandIndex, order: str = "left") -> Tensor:
    """The same U B Vh as a sum over diagonals (test cross-check only: memory-bound, slow).

    order="left": column j of U B is sum_i U[:, i] B[i, j]; "right": row i of B Vh is sum_j B[i, j] Vh[j, :].
    """
    r, n = index.r, index.n
    live = p * index.mask
    if order == "left":
        ub = u.new_zeros(u.shape[0], r)
        for d in range(-n, n + 1):
            i = torch.arange(max(0, -d), min(r, r - d))
            ub[:, i + d] += u[:, i] * live[d + n, i]
        return ub @ vh
    bvh = vh.new_zeros(r, vh.shape[1])
    for d in range(-n, n + 1):
        i = torch.arange(max(0, -d), min(r, r - d))
        bvh[i] += live[d + n, i][:, None] * vh[i + d]
    return u @ bvh


def effective_band(n: int, r: int) -> int:
    """A band wider than the matrix is clipped to r - 1 diagonals per side (with a warning)."""
    if n > r - 1:
        log.warning("DESV band n=%d is wider than r=%d allows: clipped to n=%d", n, r, r - 1)
        return r - 1
    return n


@dataclass
class BandedIncrement:
    """One linear's frozen SVD factors and its trainable band P (initialised to zero, so W = W0 exactly)."""

    u: Tensor
    vh: Tensor
    index: BandIndex
    p: nn.Parameter
    seconds: float = 0.0  # time spent forming dW (forward), for the run record
    calls: int = field(default=0)

    @classmethod
    def from_weight(cls, weight: Tensor, n: int, inclusive: bool = True) -> BandedIncrement:
        if n < 0:
            raise LowbitError(f"desv.n must be >= 0, got {n}")
        w32 = weight.detach().float()
        u, _sigma, vh = torch.linalg.svd(w32, full_matrices=False)
        r = u.shape[1]
        index = BandIndex.build(r, effective_band(n, r), inclusive)
        return cls(u, vh, index, nn.Parameter(torch.zeros(index.mask.shape)))

    def delta(self) -> Tensor:
        """dW = U B Vh in fp32 with autocast off (dW is tiny relative to W0, docs/methods.md, LSI and DESV item 13)."""
        started = time.perf_counter()
        with torch.autocast(device_type=self.u.device.type, enabled=False):
            if self.index.n == 0:  # LSI: U diag(p) Vh without forming the r x r matrix
                out = (self.u * self.p[0]) @ self.vh
            else:
                out = delta_weight(self.u, band_matrix(self.p, self.index), self.vh)
        self.seconds += time.perf_counter() - started
        self.calls += 1
        return out

    @torch.no_grad()
    def apply_mask(self) -> None:
        """Keep the invalid entries at exactly zero (after every optimizer step)."""
        self.p.mul_(self.index.mask)

    def live_parameters(self) -> int:
        return int(self.index.mask.sum())
