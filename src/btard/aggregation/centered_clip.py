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

from btard.aggregation._checks import as_matrix, ensure_finite, narrowed, widened
from btard.aggregation._rows import rows_engine
from btard.aggregation._sortnet import median_ranks

Tau = float | Literal["adaptive"]

ADAPTIVE = "adaptive"
DEFAULT_LAM = 1.0
# Floor of the adaptive radius: τ ≥ max(TAU_FLOOR_REL·‖r‖, TAU_FLOOR_ABS) (see `centered_clip`).
TAU_FLOOR_REL = 1e-3
TAU_FLOOR_ABS = 2.0**-126


@dataclass(frozen=True)
class CClipResult:
    """Outcome of `centered_clip`.

    value: the returned point r, shape (d,), dtype of the input.
    iterations: number of updates applied to the coordinate-wise median start.
    n_clipped: rows with weight < 1 at r.
    step_norm: ‖u‖ = ‖R(r)‖/n of the update evaluated (and not applied) at the returned r.
    residual: ‖R(r)‖ = n·‖u‖ at the returned r (float64 accumulation of float-`dtype` chunk arithmetic).
    tau: the radius used at r (the fixed τ, or adaptive_tau of the distances and ‖r‖ when adaptive).
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


def tau_floor(ref_norm: float) -> float:
    """The floor of the adaptive radius at a point r of norm `ref_norm` = ‖r‖:
    max(TAU_FLOOR_REL·‖r‖, TAU_FLOOR_ABS). See `centered_clip` for what it guarantees."""
    if not (math.isfinite(ref_norm) and ref_norm >= 0):
        raise ValueError(f"ref_norm must be finite and non-negative, got {ref_norm!r}")
    return max(TAU_FLOOR_REL * ref_norm, TAU_FLOOR_ABS)


def adaptive_tau(dists: Tensor, lam: float = DEFAULT_LAM, ref_norm: float = 0.0) -> float:
    """The adaptive radius τ = max(λ·median_i dists_i, tau_floor(ref_norm)) from the float64 distances
    ‖x_i − r‖ and ‖r‖ (a pure function of public values: what a verifier recomputes)."""
    med = median_of(dists) if dists.numel() else 0.0
    return max(lam * med, tau_floor(ref_norm))


def clip_weights(
    dists: Tensor, tau: Tau, lam: float = DEFAULT_LAM, *, ref_norm: float = 0.0
) -> tuple[float, Tensor]:
    """(τ, w) from the distances ‖x_i − r‖ and ‖r‖: what a verifier needs to evaluate Σ_i w_i s_i.

    τ is `tau`, or `adaptive_tau(dists, lam, ref_norm)` when tau == "adaptive", where `ref_norm` is ‖r‖ of the
    point checked (the published aggregate, or the part of it being checked), accumulated in float64; a caller
    that passes no ref_norm gets only the absolute floor TAU_FLOOR_ABS, which differs from what `centered_clip`
    used whenever the relative floor is active. w_i = min(1, τ/dists_i), and w_i = 1 where dists_i = 0.
    Computed in float64, deterministic, and identical to what `centered_clip` uses at its returned point given the
    same distances and norm. Raises ValueError for a non-1-D, negative or non-finite `dists` or `ref_norm`.
    """
    validate_tau(tau, lam)
    if not isinstance(dists, Tensor) or dists.dim() != 1:
        raise ValueError("dists must be a 1-D tensor")
    d = dists.to(torch.float64)
    if not bool(torch.isfinite(d).all()) or bool((d < 0).any()):
        raise ValueError("dists must be finite and non-negative")
    t = adaptive_tau(d, lam, ref_norm) if isinstance(tau, str) else float(tau)
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
    returned with converged=False. If every row coincides with r, R(r) = 0 and r is returned as converged.

    Adaptive radius, tau="adaptive": τ(r) = max(λ·median_i ‖x_i − r‖, τ_floor(‖r‖)), recomputed at every
    iterate, so the returned r and τ solve the fixed-point equation jointly; τ_floor(ρ) = max(α·ρ, τ_abs) with
    α = TAU_FLOOR_REL = 1e-3 and τ_abs = TAU_FLOOR_ABS = 2⁻¹²⁶ (float32's smallest normal number).

    * Bounded influence: with b < n/2 Byzantine rows, the median of the n distances lies between the smallest
      and the largest honest distance (order statistics of n values of which n − b > n/2 are honest), so
      τ ≤ λ·max_honest ‖x_h − r‖ however far the Byzantine rows are, and each row still moves r by at most τ/n
      per update and contributes at most τ to R. For λ ≤ 1 this gives a bound that depends on neither τ nor the
      attack's magnitude: if the honest rows lie within ρ of their mean μ and Δ = ‖r − μ‖ > ρ, then either
      τ ≤ Δ + ρ, so every honest weight is ≥ τ/(Δ + ρ), and projecting R(r) = 0 on (μ − r)/Δ gives
      (n − b)·τ·(Δ − ρ)/(Δ + ρ) ≤ b·τ, hence Δ ≤ ρ·n/(n − 2b); or τ > Δ + ρ, which only the floor can cause:
      then every honest weight is 1, the honest rows pull (n − b)·Δ against at most b·τ, and τ ≤ α(‖μ‖ + Δ) +
      τ_abs gives Δ ≤ b·(α‖μ‖ + τ_abs)/(n − (1 + α)b) < (α‖μ‖ + τ_abs)/(1 − α). So whatever the attack,
      Δ ≤ max(ρ·n/(n − 2b), 1.001·(10⁻³·‖μ‖ + τ_abs)): the floor costs at most 0.1 % of the honest mean's norm.
      For λ > 1 the honest rows can be unclipped while τ grows with Δ; the Byzantine pull b·τ against the
      honest (n − b)·Δ then closes a feedback loop of gain ≈ λ·b/(n − b), which diverges when it reaches 1
      (e.g. λ = 3, 7 of 16 rows flipping ×1000). Hence the default λ = 1.
    * Why a floor: without it, more than n/2 identical rows (e.g. b ≥ n/2 colluders sending one vector B) put
      the median start at B and the median distance at 0, so τ = 0, every other row gets weight 0 and the result
      is exactly B. With the floor the other rows keep weight ≥ min(1, α‖r‖/‖x_h − r‖) and the result moves
      off B (by at most about α‖r‖·(n − b)/b: no bound survives a Byzantine majority, which the configuration
      must exclude). The floor is relative to ‖r‖ so that it is scale-free like the median term, and it is
      active in honest runs only when the honest rows agree to within α of the aggregate's norm.
    * Verifiable: a verifier sees the broadcast distances n_i = ‖x_i − r‖ to the result and the result r itself;
      from them it recomputes τ = adaptive_tau(n, λ, ‖r‖) and the weights with
      `clip_weights(n, tau, lam, ref_norm=‖r‖)`, exactly as this function does (‖r‖ accumulated in float64).

    float32 inputs stay float32 (value, differences, updates); squared norms are accumulated across chunks in
    float64, widened to float64 per chunk where float32 squares overflow or underflow (see `_rows`). Each
    iteration is one read of x in cache-sized column chunks through preallocated buffers; the only
    per-iteration allocations are O(n). Finite inputs of any magnitude give a finite result: if an iterate or
    distance still overflows (differences beyond float32's range, entries near ±3.4e38 of both signs), the
    whole computation is redone deterministically on a float64 copy of x (scaled by a power of two for float64
    inputs beyond 2⁴⁴⁸) and the value is rounded back to x's dtype; tau/step_norm/residual are then reported in
    x's scale. Raises NonFiniteInputError (naming the rows) for NaN/Inf inputs, ValueError for bad parameters.
    `x` is never modified.
    """
    x = as_matrix(x)
    validate_tau(tau, lam)
    if not (math.isfinite(eps_rel) and eps_rel >= 0):
        raise ValueError(f"eps_rel must be finite and non-negative, got {eps_rel!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be a non-negative int, got {max_iter!r}")
    with torch.no_grad():
        res = _iterate(x, tau, lam, eps_rel, max_iter, check_finite=True)
        if res is None:
            wide, shift = widened(x)
            res = _iterate(wide, tau, lam, eps_rel, max_iter, check_finite=False)
            if res is None:  # unreachable: widened inputs cannot overflow float64
                raise ArithmeticError("CenteredClip overflowed on a widened float64 copy of its input")
            scale = 2.0**shift
            res = CClipResult(
                value=narrowed(res.value, shift, x.dtype),
                iterations=res.iterations,
                n_clipped=res.n_clipped,
                step_norm=res.step_norm * scale,
                residual=res.residual * scale,
                tau=res.tau * scale,
                converged=res.converged,
                passes=res.passes,
            )
    return res


def _iterate(
    x: Tensor, tau: Tau, lam: float, eps_rel: float, max_iter: int, *, check_finite: bool
) -> CClipResult | None:
    """The iteration of `centered_clip` in x's dtype; None if a norm or iterate overflowed on finite x."""
    n = x.shape[0]
    engine = rows_engine(x)
    r, row_sums, dists = engine.order_stats(*median_ranks(n), distances=True)
    if check_finite:
        ensure_finite(x, ~torch.isfinite(row_sums) | ~torch.isfinite(dists))
    ref = engine.norm(r) if isinstance(tau, str) else 0.0
    if not (bool(torch.isfinite(dists).all()) and math.isfinite(ref)):
        return None
    r_next = torch.empty_like(r)
    passes, iterations = 1, 0
    while True:
        t, w = clip_weights(dists, tau, lam, ref_norm=ref)
        if not bool((dists > 0).any()):
            step_norm, converged = 0.0, True  # every row is at r: R(r) = 0
            break
        step_norm, dists_next, ref_next = engine.step(r, w / n, r_next)
        passes += 1
        if not (
            math.isfinite(step_norm) and math.isfinite(ref_next) and bool(torch.isfinite(dists_next).all())
        ):
            return None
        if step_norm <= eps_rel * t:
            converged = True
            break
        if iterations == max_iter:
            converged = False
            break
        r, r_next, dists = r_next, r, dists_next
        if isinstance(tau, str):
            ref = ref_next
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
