"""Baseline aggregation rules on an (n, d) tensor whose rows are in peer-id order; each returns a (d,) tensor.

All rules read `x` without modifying it, return the input dtype (float32 or float64), and raise
`NonFiniteInputError` naming the rows that hold NaN/Inf. Finite inputs of any magnitude give a finite result:
where arithmetic in x's dtype overflows (sums or differences of entries near the dtype's maximum), the rule is
recomputed deterministically on a float64 copy of x (`widened`) and rounded back. Even-n median convention: the
mean of the two middle values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from btard.aggregation._checks import as_matrix, ensure_finite, narrowed, widened
from btard.aggregation._rows import rows_engine
from btard.aggregation._sortnet import median_ranks
from btard.aggregation.centered_clip import median_of


def mean(x: Tensor) -> Tensor:
    """Coordinate-wise mean (1/n) Σ_i x_i: no defence; one read of x.

    >>> mean(torch.tensor([[0.0, 2.0], [2.0, 4.0]]))
    tensor([1., 3.])
    """
    x = as_matrix(x)
    with torch.no_grad():
        out = x.mean(dim=0)
        # A column holding NaN/Inf has a non-finite mean, which makes the float64 total non-finite; so a finite
        # total proves finite inputs (an overflowing total only triggers the exact check).
        if not math.isfinite(float(out.sum(dtype=torch.float64))):
            ensure_finite(x)
            wide, shift = widened(x)
            out = narrowed(wide.mean(dim=0), shift, x.dtype)
    return out


def _all_finite(v: Tensor) -> bool:
    return math.isfinite(float(v.sum(dtype=torch.float64)))


def coordinate_median(x: Tensor) -> Tensor:
    """Coordinate-wise median; for even n the mean of the two middle values of each column.

    >>> coordinate_median(torch.tensor([[0.0], [1.0], [5.0], [9.0]]))
    tensor([3.])
    """
    x = as_matrix(x)
    with torch.no_grad():
        out, row_sums, _ = rows_engine(x).order_stats(*median_ranks(x.shape[0]))
        ensure_finite(x, ~torch.isfinite(row_sums))
        if not _all_finite(out):
            wide, shift = widened(x)
            out = narrowed(rows_engine(wide).order_stats(*median_ranks(x.shape[0]))[0], shift, x.dtype)
    return out


def trimmed_mean(x: Tensor, f: int) -> Tensor:
    """Coordinate-wise mean after dropping the f largest and the f smallest values of each column.

    Requires 0 ≤ 2f < n (ValueError otherwise).

    >>> trimmed_mean(torch.tensor([[0.0], [1.0], [2.0], [100.0]]), f=1)
    tensor([1.5000])
    """
    x = as_matrix(x)
    n = x.shape[0]
    if isinstance(f, bool) or not isinstance(f, int) or f < 0 or 2 * f >= n:
        raise ValueError(f"trimmed_mean needs an int f with 0 <= 2f < n = {n}, got f={f!r}")
    with torch.no_grad():
        out, row_sums, _ = rows_engine(x).order_stats(range(f, n - f), 1.0 / (n - 2 * f))
        ensure_finite(x, ~torch.isfinite(row_sums))
        if not _all_finite(out):
            wide, shift = widened(x)
            out = rows_engine(wide).order_stats(range(f, n - f), 1.0 / (n - 2 * f))[0]
            out = narrowed(out, shift, x.dtype)
    return out


def krum_scores(x: Tensor, f: int) -> Tensor:
    """Krum score of each row: the sum of its squared distances to its n − f − 2 nearest other rows (float64)."""
    n = x.shape[0]
    k = n - f - 2
    sq = rows_engine(x).pairwise_sq_distances()
    if not bool(torch.isfinite(sq).all()):
        ensure_finite(x, ~torch.isfinite(sq).all(dim=1))
        sq = rows_engine(widened(x)[0]).pairwise_sq_distances()  # same order, in range
    others = sq.masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), math.inf)
    return torch.sort(others, dim=1).values[:, :k].sum(dim=1)


def krum(x: Tensor, f: int, m: int = 1) -> Tensor:
    """Krum (m = 1) or multi-Krum (average of the m rows with the lowest Krum scores), ties to the lower index.

    Score = sum of squared distances to the n − f − 2 nearest other rows; requires f ≥ 0, n − f − 2 ≥ 1 and
    1 ≤ m ≤ n (ValueError otherwise). Pairwise distances cost O(n²·d) float64 work in one read of x.

    >>> krum(torch.tensor([[0.0], [1.0], [2.0], [100.0], [101.0]]), f=1)
    tensor([1.])
    """
    x = as_matrix(x)
    n = x.shape[0]
    if isinstance(f, bool) or not isinstance(f, int) or f < 0 or n - f - 2 < 1:
        raise ValueError(f"krum needs an int f >= 0 with n - f - 2 >= 1 (n = {n}), got f={f!r}")
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= n:
        raise ValueError(f"krum needs an int m with 1 <= m <= n = {n}, got m={m!r}")
    with torch.no_grad():
        scores = krum_scores(x, f)
        best = torch.sort(scores, stable=True).indices[:m]
        if m == 1:
            return x[int(best[0])].clone()
        weights = torch.zeros(n, dtype=x.dtype, device=x.device)
        weights[best] = 1.0 / m
        out = weights @ x
        if not _all_finite(out):
            wide, shift = widened(x)
            out = narrowed(weights.to(torch.float64) @ wide, shift, x.dtype)
        return out


@dataclass(frozen=True)
class WeiszfeldResult:
    """Outcome of `weiszfeld`: the point, updates applied, and whether the step criterion was met."""

    value: Tensor
    iterations: int
    converged: bool


def weiszfeld(x: Tensor, eps: float = 1e-8, max_iter: int = 100, nu: float = 1e-8) -> WeiszfeldResult:
    """Geometric median argmin_r Σ_i ‖x_i − r‖ by smoothed Weiszfeld iterations (Pillutla et al., RFA).

    Starting from the mean: r ← Σ_i β_i x_i / Σ_i β_i with β_i = 1/max(ν, ‖x_i − r‖); stops after the first update
    with ‖Δr‖ ≤ eps·median_i ‖x_i − r‖ + 4·ε_dtype·‖r‖ (the first term is scale- and translation-invariant; the
    second is the rounding resolution of r itself, below which float32 updates are noise) or after max_iter updates.
    Each update costs one read of x.
    """
    x = as_matrix(x)
    if not (math.isfinite(eps) and eps >= 0 and math.isfinite(nu) and nu > 0):
        raise ValueError(f"need eps >= 0 and nu > 0 (finite), got eps={eps!r}, nu={nu!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be a non-negative int, got {max_iter!r}")
    with torch.no_grad():
        res = _weiszfeld(x, eps, max_iter, nu, check_finite=True)
        if res is None:
            wide, shift = widened(x)
            res = _weiszfeld(wide, eps, max_iter, nu * 2.0**-shift, check_finite=False)
            if res is None:  # unreachable: widened inputs cannot overflow float64
                raise ArithmeticError("Weiszfeld overflowed on a widened float64 copy of its input")
            res = WeiszfeldResult(narrowed(res.value, shift, x.dtype), res.iterations, res.converged)
    return res


def _weiszfeld(
    x: Tensor, eps: float, max_iter: int, nu: float, *, check_finite: bool
) -> WeiszfeldResult | None:
    """The iterations of `weiszfeld` in x's dtype; None if a norm or iterate overflowed on finite x."""
    iterations, converged = 0, False
    mean_r = x.mean(dim=0)
    engine = rows_engine(x)
    dists = engine.distances(mean_r)
    if check_finite:
        ensure_finite(x, ~torch.isfinite(dists))
    if not bool(torch.isfinite(dists).all()):
        return None
    r, r_next = mean_r, torch.empty_like(mean_r)
    while iterations < max_iter and not converged:
        beta = 1.0 / dists.clamp(min=nu)
        step, dists, r_norm = engine.step(r, beta / beta.sum(), r_next)
        if not (math.isfinite(step) and math.isfinite(r_norm) and bool(torch.isfinite(dists).all())):
            return None
        r, r_next = r_next, r
        iterations += 1
        resolution = 4 * torch.finfo(x.dtype).eps * r_norm
        converged = step <= eps * median_of(dists) + resolution
    return WeiszfeldResult(value=r, iterations=iterations, converged=converged)


def geometric_median(x: Tensor, eps: float = 1e-8, max_iter: int = 100, nu: float = 1e-8) -> Tensor:
    """The geometric median of the rows of `x` by smoothed Weiszfeld iterations; see `weiszfeld`.

    >>> geometric_median(torch.tensor([[0.0], [1.0], [3.0]]))
    tensor([1.])
    """
    return weiszfeld(x, eps=eps, max_iter=max_iter, nu=nu).value
