"""Pure verification math of one BTARD step: partitioning, random projections, the CenteredClip
fixed-point check (§3.7) and the tolerance comparison used by validators (§5).

Everything here is a deterministic function of public values, so every honest peer computes the same verdict.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import blake3
import numpy as np
import torch

from btard.aggregation import clip_weights
from btard.crypto import digest

# Float error allowed in the fixed-point sum, relative to Σ w_i n_i (each term ≤ τ). float32 round-off of the
# aggregator's iterate is ~1e-7 relative; 1e-5 leaves two orders of magnitude of margin.
FLOAT_SLACK = 1e-5


def part_bounds(d: int, n: int) -> list[tuple[int, int]]:
    """Cut range(d) into n contiguous parts whose sizes differ by at most one (larger parts first)."""
    if n <= 0:
        raise ValueError("need at least one part")
    base, extra = divmod(d, n)
    out, start = [], 0
    for j in range(n):
        end = start + base + (1 if j < extra else 0)
        out.append((start, end))
        start = end
    return out


def part_order(peers: Sequence[bytes], r_prev: bytes) -> list[bytes]:
    """Deterministic shuffle of `peers` by the previous shared random value: part j is aggregated by out[j]."""
    return list(_part_order(tuple(peers), r_prev))


@functools.lru_cache(maxsize=64)
def _part_order(peers: tuple[bytes, ...], r_prev: bytes) -> tuple[bytes, ...]:
    return tuple(sorted(peers, key=lambda p: digest("part-order", r_prev, p)))


class ProjectionCache:
    """Memoizes z(r) per part: a pure function of public values, so sharing one cache between peers of a
    simulation changes nothing but speed. Holds the vectors of the last ``keep`` shared random values (a
    validator needs the previous step's); older buffers are recycled for new vectors of the same shape, so
    a long run does not keep faulting in fresh memory (one step's vectors take 360 MB at d = 11.2M, K = 4)."""

    def __init__(self, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError("keep at least one random value")
        self._keep = keep
        self._store: dict[bytes, dict[tuple, torch.Tensor]] = OrderedDict()
        self._free: dict[tuple[int, int], list[torch.Tensor]] = {}

    def get(self, r: bytes, j: int, length: int, k: int) -> torch.Tensor:
        entries = self._store.get(r)
        if entries is None:
            entries = self._store[r] = {}
            while len(self._store) > self._keep:
                _, old = self._store.popitem(last=False)
                for t in old.values():
                    self._free.setdefault(tuple(t.shape), []).append(t)
        key = (j, length, k)
        z = entries.get(key)
        if z is None:
            pool = self._free.get((k, length))
            z = entries[key] = projection_vectors(r, j, length, k, out=pool.pop() if pool else None)
        return z


_SQRT3 = math.sqrt(3.0)
_SCALE = 2.0 * _SQRT3 / 2.0**32
_CHUNK = 1 << 18  # elements per BLAKE3 read: 1 MB of stream, converted while it is in cache


def projection_vectors(
    r: bytes, j: int, length: int, k: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """K i.i.d. vectors for part j, uniform on [−√3, √3) (mean −√3/2³², variance 1 − 2⁻⁶⁴), float64, from a
    BLAKE3 stream keyed by the shared random value r: element i is v_i·2√3/2³² for the i-th little-endian int32
    v_i of the stream (one IEEE multiplication of an exact integer, so every platform gets the same bits).

    Why uniform and not Gaussian: the uniform distribution is strictly sub-Gaussian, so an honest residual R
    gives P(|⟨z, R⟩| > c‖R‖) ≤ 2·exp(−c²/2) as with N(0, 1); and by Ball's cube-slicing theorem the density of
    ⟨z, e⟩ never exceeds √2/(2√3)/‖e‖ ≈ 0.41/‖e‖ (N(0, 1): 0.40/‖e‖), so a wrong aggregate escapes a
    projection no more often than under Gaussian vectors, whatever the shape of its error (unlike ±1 vectors,
    which miss e = (a, −a, 0, …) half of the time). Why BLAKE3: the vectors depend on nothing but these bytes,
    so peers on any platform or torch version agree; and it is ~8× faster than torch.randn (which was the
    largest cost of a step at d = 11.2M).
    """
    total = k * length
    if out is None:
        out = torch.empty((k, length), dtype=torch.float64)
    elif out.shape != (k, length) or out.dtype != torch.float64 or not out.is_contiguous():
        raise ValueError("out must be a contiguous float64 tensor of shape (k, length)")
    flat = out.numpy().reshape(-1)
    h = blake3.blake3(digest("projection", r, j, length, k))
    for a in range(0, total, _CHUNK):
        b = min(a + _CHUNK, total)
        v = np.frombuffer(h.digest(length=4 * (b - a), seek=4 * a), dtype="<i4")
        np.multiply(v, _SCALE, out=flat[a:b])
    return out


def project(part: torch.Tensor, agg: torch.Tensor, z: torch.Tensor) -> tuple[float, np.ndarray]:
    """(‖part − agg‖, ⟨z_k, part − agg⟩ for every k), accumulated in float64.

    The difference is taken in float32 (IEEE elementwise, so every peer gets the same bits) and widened once:
    its rounding, ≤ 2⁻²⁴ of each entry, is far below the check's FLOAT_SLACK. Where it overflows (entries near
    ±3.4e38 of opposite signs) it is taken in float64 instead, so a finite part never yields an infinite report."""
    diff32 = part - agg
    if bool(torch.isfinite(diff32).all()):
        diff = diff32.to(torch.float64)
    else:
        diff = part.to(torch.float64) - agg.to(torch.float64)
    return float(diff.norm()), (z @ diff).numpy()


def projections_for(
    grad: torch.Tensor, agg: torch.Tensor, bounds: Sequence[tuple[int, int]], zs: Sequence[torch.Tensor]
) -> tuple[np.ndarray, np.ndarray]:
    """Norms (n,) and projections (n, K) of a full gradient against the full aggregate, part by part."""
    norms = np.empty(len(bounds))
    projs = np.empty((len(bounds), zs[0].shape[0]))
    for j, (a, b) in enumerate(bounds):
        norms[j], projs[j] = project(grad[a:b], agg[a:b], zs[j])
    return norms, projs


@dataclass(frozen=True)
class FixedPointCheck:
    """Result of the CenteredClip fixed-point check for one part."""

    ok: bool
    tau: float
    statistic: float  # max_k |Σ_i w_i s_i^k|
    tolerance: float
    implausible: tuple[int, ...]  # rows whose |s| > c·n (index into the inputs)


def fixed_point_check(
    norms: np.ndarray,
    projs: np.ndarray,
    *,
    tau: float | str,
    lam: float,
    eps_rel: float,
    plausibility: float,
    trusted: np.ndarray | None = None,
    ref_norm: float = 0.0,
) -> FixedPointCheck:
    """Check |Σ_i min(1, τ/n_i) s_i^k| ≤ tol for every k, with τ recomputed from the norms when adaptive
    (floored at `tau_floor(ref_norm)`, ‖ĝ[j]‖ of the published part, as `centered_clip` floors it).

    tol = c·(m·eps_rel·τ + FLOAT_SLACK·Σ_i w_i n_i): an honest aggregator stops with ‖R‖ ≤ m·eps_rel·τ (the
    stopping rule of `centered_clip`), and ⟨z, R⟩ is sub-Gaussian with variance ‖R‖² because z is drawn after R is
    committed, so an
    honest aggregator fails with probability ≤ 2·Φ(−c) per projection (c = 8: ~1e-15). Rows with |s| > c·n
    are implausible for any honest report (same tail bound); unless `trusted` marks them (their values were
    recomputed from the signed part), they make the check fail.
    """
    norms = np.asarray(norms, dtype=np.float64)
    projs = np.asarray(projs, dtype=np.float64)
    m = len(norms)
    t, w = clip_weights(torch.from_numpy(norms), tau, lam=lam, ref_norm=ref_norm)
    w = w.numpy()
    stat = float(np.abs(w @ projs).max()) if m else 0.0
    tol = plausibility * (m * eps_rel * t + FLOAT_SLACK * float(w @ norms)) + 1e-30
    bad_rows = np.nonzero((np.abs(projs) > plausibility * norms[:, None] + 1e-30).any(axis=1))[0]
    if trusted is not None:
        bad_rows = [i for i in bad_rows if not trusted[i]]
    implausible = tuple(int(i) for i in bad_rows)
    return FixedPointCheck(stat <= tol and not implausible, t, stat, tol, implausible)


class CheckCache:
    """Memoizes `fixed_point_check` and `scale_ratio` by their exact inputs (the bytes of the arrays and the
    parameters). Both are pure functions of public values, so peers simulated in one process can share one
    cache: each part's check is then computed once per step instead of once per peer, with the same result.
    Like `messages.DecodeCache`, an optimisation of the simulator; bounded."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._max = max_entries
        self._store: dict[tuple, object] = {}

    def _get(self, key: tuple, compute):
        hit = self._store.get(key)
        if hit is None:
            hit = compute()
            if len(self._store) >= self._max:
                self._store.clear()
            self._store[key] = hit
        return hit

    def fixed_point_check(
        self,
        norms: np.ndarray,
        projs: np.ndarray,
        *,
        tau: float | str,
        lam: float,
        eps_rel: float,
        plausibility: float,
        trusted: np.ndarray | None = None,
        ref_norm: float = 0.0,
    ) -> FixedPointCheck:
        norms = np.asarray(norms, dtype=np.float64)
        projs = np.asarray(projs, dtype=np.float64)
        t = None if trusted is None else np.asarray(trusted, dtype=bool)
        key = (
            "fp",
            norms.shape,
            norms.tobytes(),
            projs.shape,
            projs.tobytes(),
            None if t is None else (t.shape, t.tobytes()),
            tau,
            lam,
            eps_rel,
            plausibility,
            ref_norm,
        )
        return self._get(
            key,
            lambda: fixed_point_check(
                norms,
                projs,
                tau=tau,
                lam=lam,
                eps_rel=eps_rel,
                plausibility=plausibility,
                trusted=t,
                ref_norm=ref_norm,
            ),
        )

    def scale_ratio(self, norms: np.ndarray, projs: np.ndarray) -> float:
        norms = np.asarray(norms, dtype=np.float64)
        projs = np.asarray(projs, dtype=np.float64)
        key = ("scale", norms.shape, norms.tobytes(), projs.shape, projs.tobytes())
        return self._get(key, lambda: scale_ratio(norms, projs))


def projection_report_matches(
    reported: tuple[float, np.ndarray], recomputed: tuple[float, np.ndarray], rtol: float = 1e-9
) -> bool:
    """Whether a PROJ entry matches the values recomputed from the signed part (float64 round-off only)."""
    n_rep, s_rep = reported
    n_ok, s_ok = recomputed
    scale = max(n_ok, 1e-30) * math.sqrt(max(len(s_ok), 1))
    return abs(n_rep - n_ok) <= rtol * scale + 1e-30 and bool(
        np.all(np.abs(s_rep - s_ok) <= rtol * scale * 10)
    )


def validation_deviation(
    reported_norms: np.ndarray,
    reported_projs: np.ndarray,
    recomputed_norms: np.ndarray,
    recomputed_projs: np.ndarray,
) -> float:
    """Estimate of ‖e‖, the distance between what the target sent and the recomputed gradient.

    For a deviation e, s − s' = ⟨z, e_j⟩ ~ N(0, ‖e_j‖²) per projection, so Σ_j mean_k (s − s')² is ‖e‖² times a
    χ²(nK)/(nK) variable; norms add |n − n'| ≤ ‖e_j‖ (triangle inequality), counted as a floor.
    """
    ds = np.asarray(reported_projs) - np.asarray(recomputed_projs)
    est = math.sqrt(float((ds**2).mean(axis=1).sum()))
    dn = float(np.abs(np.asarray(reported_norms) - np.asarray(recomputed_norms)).max(initial=0.0))
    return max(est, dn)


def validation_tolerance(grad_norm: float, rtol: float) -> float:
    """Largest benign deviation: rtol·‖g'‖ (float32 non-determinism is ~1e-6 relative; default rtol 1e-4)."""
    return rtol * grad_norm + 1e-12


# A part whose median reported distance exceeds this multiple of the robust spread of the reported projections
# is not applied. Measured at honest CenteredClip fixed points (with sign-flip, ALIE, same-vector and
# sit-at-the-aggregate Byzantine inputs, d ∈ {6, 300}, 1000 trials each): ratio ≤ 12.6 for ≥ 5 reports.
SCALE_LIMIT = 30.0
SCALE_MIN_REPORTS = 5


def scale_ratio(norms: np.ndarray, projs: np.ndarray) -> float:
    """median_i n_i / (MAD_i of s_i, averaged over projections, scaled to σ).

    Pairwise differences s_i − s_l = ⟨z, g_i − g_l⟩ do not depend on the aggregate, so the MAD of the projections
    measures the honest spread, while the distances n_i grow with any shift e of the aggregate. With b < n/2
    reports from liars, both medians stay within the range of honest values. At an honest fixed point the ratio
    is ~1; a shift e makes it ~‖e‖/(honest distance). This closes the gap of the fixed-point check, whose
    clipped terms saturate at τ, so colluding reporters could otherwise hide a shift of any size (see
    test_validation.py). It never bans (a ratio is not proof); the part is simply not applied.
    """
    norms = np.asarray(norms, dtype=np.float64)
    projs = np.asarray(projs, dtype=np.float64)
    med_n = float(np.median(norms))
    if med_n <= 1e-30:
        return 0.0
    m = np.median(projs, axis=0)
    mad = np.median(np.abs(projs - m), axis=0) / 0.6745
    spread = float(np.sqrt((mad**2).mean()))
    return med_n / spread if spread > 0 else float("inf")
