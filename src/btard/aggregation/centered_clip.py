"""CenteredClip (protocol §4) with a verifiable stopping rule and an optional adaptive radius.

Definitions used throughout (rows of x are the inputs g_1..g_n in peer-id order):

* weights  w_i(r, τ) = min(1, τ/‖x_i − r‖), with w_i = 1 when ‖x_i − r‖ = 0 (its contribution x_i − r is 0);
* residual R(r) = Σ_i w_i (x_i − r); a fixed point of CenteredClip is a root of R, which is what the projection
  check of protocol §3 step 7 verifies;
* median convention (coordinate-wise start and adaptive τ): the middle value for odd n and the mean of the two
  middle values, (v_(n/2−1) + v_(n/2)) / 2 with 0-based ranks, for even n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from btard.aggregation._checks import as_matrix, ensure_finite
from btard.aggregation._rows import rows_engine
from btard.aggregation._sortnet import median_ranks

Tau = float | Literal["adaptive"]

ADAPTIVE = "adaptive"
DEFAULT_LAM = 1.0


@dataclass(frozen=True)
class CClipResult:
    """Outcome of `centered_clip`.

    value: the returned point r, shape (d,), dtype of the input.
    iterations: number of updates applied to the coordinate-wise median start.
    n_clipped: rows with weight < 1 at r.
    step_norm: ‖u‖ = ‖R(r)‖/n of the update evaluated (and not applied) at the returned r.
    residual: ‖R(r)‖ = n·‖u‖ at the returned r (float64 accumulation of float-`dtype` chunk arithmetic).
    tau: the radius used at r (the fixed τ, or λ·median_i ‖x_i − r‖ when adaptive).
    converged: residual ≤ n·eps_rel·τ was reached within max_iter updates.
    passes: reads of the whole input made (one for the median start and its distances, one per update evaluated).
    """

    value: Tensor
    iterations: int
    n_clipped: int
    step_norm: float
    residual: float
    tau: float
    converged: bool
    passes: int


def validate_tau(tau: Tau, lam: float) -> None:
    """Raise ValueError unless tau is a positive finite float, or "adaptive" with a positive finite lam."""
    if isinstance(tau, str):
        if tau != ADAPTIVE:
            raise ValueError(f"tau must be a positive float or {ADAPTIVE!r}, got {tau!r}")
        if isinstance(lam, bool) or not (math.isfinite(lam) and lam > 0):
            raise ValueError(f"lam must be a positive finite float, got {lam!r}")
    elif isinstance(tau, bool) or not isinstance(tau, int | float) or not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a positive finite float or {ADAPTIVE!r}, got {tau!r}")


def median_of(values: Tensor) -> float:
    """Median of a 1-D float64 tensor with the module's convention (mean of the two middle values, even n)."""
    s = torch.sort(values).values
    n = s.numel()
    if n % 2:
        return float(s[n // 2])
    return (float(s[n // 2 - 1]) + float(s[n // 2])) / 2.0


def clip_weights(dists: Tensor, tau: Tau, lam: float = DEFAULT_LAM) -> tuple[float, Tensor]:
    """(τ, w) from the distances ‖x_i − r‖ alone: what a verifier needs to evaluate Σ_i w_i s_i.

    τ is `tau`, or λ·median(dists) when tau == "adaptive" (0.0 for no rows); w_i = min(1, τ/dists_i), and w_i = 1
    where dists_i = 0 (so τ = 0 gives w = 1 on rows at r and 0 elsewhere). Computed in float64, deterministic,
    and identical to what `centered_clip` uses at its returned point given the same distances.
    Raises ValueError for a non-1-D, negative or non-finite `dists`.
    """
    validate_tau(tau, lam)
    if not isinstance(dists, Tensor) or dists.dim() != 1:
        raise ValueError("dists must be a 1-D tensor")
    d = dists.to(torch.float64)
    if not bool(torch.isfinite(d).all()) or bool((d < 0).any()):
        raise ValueError("dists must be finite and non-negative")
    if isinstance(tau, str):
        t = lam * median_of(d) if d.numel() else 0.0
    else:
        t = float(tau)
    w = torch.ones_like(d)
    positive = d > 0
    w[positive] = torch.clamp(t / d[positive], max=1.0)
    return t, w


def centered_clip(
    x: Tensor,
    tau: Tau = ADAPTIVE,
    *,
    lam: float = DEFAULT_LAM,
    eps_rel: float = 1e-4,
    max_iter: int = 1000,
) -> CClipResult:
    """CenteredClip of the rows of `x` (n, d), started from their coordinate-wise median.

    Iteration (protocol §4): at the current r compute τ (fixed, or adaptive below), w_i = min(1, τ/‖x_i − r‖) and
    u = (1/n) Σ_i w_i (x_i − r). Stopping rule: if ‖u‖ ≤ eps = eps_rel·τ, return r *without* applying u, so the
    returned point satisfies ‖R(r)‖ = n·‖u‖ ≤ n·eps_rel·τ (up to float error of the sums, ~1e-7·Σ_i w_i‖x_i − r‖
    for float32) — the bound the projection check's tolerance is built on. Otherwise r ← r + u (rounded to the
    input dtype; the next distances are taken to that rounded point). After `max_iter` updates the current r is
    returned with converged=False. A radius τ = 0 (adaptive, when more than half the rows coincide with r) gives
    w = 0 off r and R(r) = 0: r is returned as converged.

    Adaptive radius, tau="adaptive": τ(r) = λ·median_i ‖x_i − r‖, recomputed at every iterate, so the returned r
    and τ solve the fixed-point equation jointly.

    * Bounded influence: with b < n/2 Byzantine rows, the median of the n distances lies between the smallest
      and the largest honest distance (order statistics of n values of which n − b > n/2 are honest), so
      τ ≤ λ·max_honest ‖x_h − r‖ however far the Byzantine rows are, and each row still moves r by at most τ/n
      per update and contributes at most τ to R. For λ ≤ 1 this gives a bound that depends on neither τ nor the
      attack's magnitude: if the honest rows lie within ρ of their mean μ and Δ = ‖r − μ‖ > ρ, then τ ≤ Δ + ρ, so
      every honest weight is ≥ τ/(Δ + ρ), and projecting R(r) = 0 on (μ − r)/Δ gives
      (n − b)·τ·(Δ − ρ)/(Δ + ρ) ≤ b·τ, hence Δ ≤ ρ·n/(n − 2b). For λ > 1 the honest rows can be
      unclipped while τ grows with Δ; the Byzantine pull b·τ against the honest (n − b)·Δ then closes a feedback
      loop of gain ≈ λ·b/(n − b), which diverges when it reaches 1 (e.g. λ = 3, 7 of 16 rows flipping ×1000).
      Hence the default λ = 1.
    * Verifiable: a verifier sees only the broadcast distances n_i = ‖x_i − r‖ to the result; from them it
      recomputes τ = λ·median(n_i) and the weights with `clip_weights`, exactly as this function does.

    float32 inputs stay float32 (value, differences, updates); squared norms are accumulated across chunks in
    float64. Each iteration is one read of x in cache-sized column chunks through preallocated buffers (see
    `_rows`); the only per-iteration allocations are O(n). Raises NonFiniteInputError (naming the rows) for
    NaN/Inf inputs, ValueError for bad parameters. `x` is never modified.
    """
    x = as_matrix(x)
    validate_tau(tau, lam)
    if not (math.isfinite(eps_rel) and eps_rel >= 0):
        raise ValueError(f"eps_rel must be finite and non-negative, got {eps_rel!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be a non-negative int, got {max_iter!r}")
    n = x.shape[0]
    with torch.no_grad():
        engine = rows_engine(x)
        r, row_sums, dists = engine.order_stats(*median_ranks(n), distances=True)
        ensure_finite(x, ~torch.isfinite(row_sums) | ~torch.isfinite(dists))
        if not bool(torch.isfinite(dists).all()):
            raise ValueError("distances overflow the float range; rescale the inputs")
        r_next = torch.empty_like(r)
        passes, iterations = 1, 0
        while True:
            t, w = clip_weights(dists, tau, lam)
            if t == 0.0:
                step_norm, converged = 0.0, True
                break
            step_norm, dists_next = engine.step(r, w / n, r_next)
            passes += 1
            if step_norm <= eps_rel * t:
                converged = True
                break
            if iterations == max_iter:
                converged = False
                break
            r, r_next, dists = r_next, r, dists_next
            iterations += 1
    return CClipResult(
        value=r,
        iterations=iterations,
        n_clipped=int((w < 1).sum()),
        step_norm=step_norm,
        residual=n * step_norm,
        tau=t,
        converged=converged,
        passes=passes,
    )
