"""CenteredClip: stopping rule, verifier consistency, bounded influence, adaptive radius, edge cases."""

import math

import pytest
import torch

from btard.aggregation import CClipResult, NonFiniteInputError, centered_clip, clip_weights
from btard.aggregation.centered_clip import TAU_FLOOR_ABS, TAU_FLOOR_REL


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_residual(x: torch.Tensor, r: torch.Tensor, tau, lam: float = 1.0) -> tuple[float, float, range]:
    """(‖Σ_i w_i (x_i − r)‖, τ, plausible #clipped) recomputed from scratch in float64, as a verifier would.

    A row whose distance equals τ up to float error (the median row itself when λ = 1) may count either way."""
    diff = x.double() - r.double()
    dists = diff.norm(dim=1)
    if tau == "adaptive":
        s = torch.sort(dists).values
        n = len(s)
        med = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
        t = lam * float(med)
    else:
        t = float(tau)
    w = torch.where(dists > 0, torch.clamp(t / dists, max=1.0), torch.ones_like(dists))
    return float((w @ diff).norm()), t, range(int((w < 1 - 1e-6).sum()), int((w < 1).sum()) + 1)


def sign_flip_inputs(n=16, d=1000, flipped=7, seed=0) -> torch.Tensor:
    """Honest rows N(0, 1) (spread ≈ √d ≫ 1); the first `flipped` rows sent as −1000 × their honest row."""
    x = torch.randn(n, d, generator=gen(seed))
    x[:flipped] *= -1000.0
    return x


@pytest.mark.parametrize("tau", [0.3, 1.0, 10.0, "adaptive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_returned_point_satisfies_the_verified_stopping_rule(tau, dtype):
    x = sign_flip_inputs(n=16, d=300, seed=1).to(dtype)
    x[7:] += 0.5  # honest rows share a common offset, as gradients do
    eps_rel = 1e-4
    res = centered_clip(x, tau, eps_rel=eps_rel)
    assert isinstance(res, CClipResult) and res.converged
    assert res.value.dtype == dtype and res.value.shape == (300,)
    n = x.shape[0]
    assert res.residual == pytest.approx(n * res.step_norm)
    assert res.residual <= n * eps_rel * res.tau
    # An independent float64 recomputation at the returned point, as a verifier does it from its own data.
    residual, t, clipped = reference_residual(x, res.value, tau)
    assert t == pytest.approx(res.tau, rel=1e-6)
    assert res.n_clipped in clipped
    float_slack = 1e-5 if dtype == torch.float32 else 1e-12
    assert residual <= n * eps_rel * res.tau * (1 + 1e-3) + float_slack * n * res.tau


@pytest.mark.parametrize("tau", [1.0, "adaptive"])
def test_clip_weights_reproduce_tau_and_weights_at_the_result(tau):
    x = sign_flip_inputs(n=11, d=200, flipped=4, seed=2)
    res = centered_clip(x, tau)
    dists = (x.double() - res.value.double()).norm(dim=1)
    t, w = clip_weights(dists, tau)
    assert t == pytest.approx(res.tau, rel=1e-6)
    assert int((w < 1 - 1e-6).sum()) <= res.n_clipped <= int((w < 1).sum())
    assert w.dtype == torch.float64 and bool(((w > 0) & (w <= 1)).all())
    torch.testing.assert_close(w, torch.clamp(t / dists, max=1.0))


def test_clip_weights_conventions():
    d = torch.tensor([0.0, 1.0, 2.0, 4.0], dtype=torch.float64)
    t, w = clip_weights(d, "adaptive", lam=1.0)
    assert t == 1.5  # even n: mean of the two middle distances
    assert w.tolist() == [1.0, 1.0, 0.75, 0.375]
    t, w = clip_weights(d, "adaptive", lam=2.0)
    assert t == 3.0
    t, w = clip_weights(torch.tensor([0.0, 0.0, 0.0, 5.0]), "adaptive")
    # median 0: τ is the absolute floor; weight 1 at distance 0, never NaN
    assert t == TAU_FLOOR_ABS and w.tolist() == [1.0, 1.0, 1.0, TAU_FLOOR_ABS / 5]
    t, w = clip_weights(torch.tensor([0.0, 0.0, 0.0, 5.0]), "adaptive", ref_norm=2000.0)
    assert t == 2000.0 * TAU_FLOOR_REL and w.tolist() == [1.0, 1.0, 1.0, 0.4]  # the relative floor
    t, _ = clip_weights(d, "adaptive", ref_norm=2000.0)
    assert t == 2.0  # max(λ·median = 1.5, 10⁻³·2000)
    t, _ = clip_weights(d, 1.0, ref_norm=2000.0)
    assert t == 1.0  # a fixed τ has no floor
    t, w = clip_weights(torch.tensor([3.0, 1.0, 2.0]), 1.0)
    assert t == 1.0 and w.tolist() == pytest.approx([1 / 3, 1.0, 0.5])
    t, w = clip_weights(torch.empty(0, dtype=torch.float64), "adaptive")
    assert t == TAU_FLOOR_ABS and w.numel() == 0
    with pytest.raises(ValueError):
        clip_weights(torch.tensor([1.0, float("nan")]), 1.0)
    with pytest.raises(ValueError):
        clip_weights(torch.tensor([1.0, -1.0]), 1.0)


@pytest.mark.parametrize("tau", [1.0, "adaptive"])
def test_identical_rows_give_zero_distances_and_no_nan(tau):
    row = torch.randn(50, generator=gen(3))
    x = row.repeat(6, 1)
    res = centered_clip(x, tau)
    assert torch.equal(res.value, row)
    assert res.converged and res.iterations == 0 and res.residual == 0.0 and res.n_clipped == 0


def test_majority_at_the_median_at_zero_gets_the_absolute_floor():
    x = torch.zeros(5, 4)
    x[3] = 1.0
    x[4] = -7.0
    res = centered_clip(x, "adaptive")
    assert res.tau == TAU_FLOOR_ABS and res.converged and res.residual <= 5 * 1e-4 * res.tau
    assert torch.equal(res.value, torch.zeros(4))
    assert res.n_clipped == 2
    fixed = centered_clip(x, 1.0)  # τ = 1: the pulls of rows 3 (w = 1/2) and 4 (w = 1/14) cancel at 0
    assert fixed.converged and fixed.iterations == 0 and torch.equal(fixed.value, torch.zeros(4))


@pytest.mark.parametrize("f", [1, 3, 7])
@pytest.mark.parametrize("aligned", [True, False])
def test_bounded_influence_fixed_tau(f, aligned):
    """Honest rows within ρ of their mean μ_h; f rows moved 1e6 away. If τ ≥ 2hρ/(h − f) (h = n − f), no fixed
    point can clip an honest row (otherwise projecting R = 0 on μ_h − r forces Δ ≤ ρ(h + f)/(h − f), hence
    τ < Δ + ρ ≤ 2hρ/(h − f)), and then h(μ_h − r) = R − Σ_byz w_b (x_b − r) gives
        Δ = ‖r − μ_h‖ ≤ (f·τ + ‖R‖)/h,   i.e. C·τ·f/n with C = n/(n − f) ≤ 2 (plus ‖R‖/h ≤ n·eps/h)."""
    n, d, tau, rho = 16, 64, 1.0, 0.05
    h = n - f
    g = gen(10 + f)
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    noise = torch.randn(h, d, generator=g, dtype=torch.float64)
    noise *= rho * torch.rand(h, 1, generator=g, dtype=torch.float64) / noise.norm(dim=1, keepdim=True)
    honest = mu + noise
    direction = torch.randn(f if not aligned else 1, d, generator=g, dtype=torch.float64)
    byz = mu + 1e6 * direction / direction.norm(dim=1, keepdim=True) * torch.ones(f, 1, dtype=torch.float64)
    x = torch.cat([byz, honest])
    mu_h = honest.mean(dim=0)
    assert tau >= 2 * h * float((honest - mu_h).norm(dim=1).max()) / (h - f)
    res = centered_clip(x, tau)
    delta = float((res.value - mu_h).norm())
    assert res.n_clipped == f  # exactly the Byzantine rows are clipped
    assert delta <= (f * tau + res.residual) / h * (1 + 1e-9)
    assert delta <= (n / (n - f)) * tau * f / n + res.residual / h + 1e-12


@pytest.mark.parametrize("f", [1, 3, 7])
def test_bounded_influence_adaptive_tau(f):
    """With τ = λ·median distance and λ ≤ 1: τ ≤ max honest distance ≤ Δ + ρ, so every honest weight is at least
    τ/(Δ + ρ); projecting R on (μ_h − r)/Δ gives h·τ·(Δ − ρ)/(Δ + ρ) ≤ f·τ + ‖R‖, i.e. with
    q = (f + ‖R‖/τ)/h < 1:  Δ ≤ ρ·(1 + q)/(1 − q)  (= ρ·n/(n − 2f) at an exact fixed point),
    independent of how far (1e6) the f rows are."""
    n, d = 16, 64
    h = n - f
    g = gen(20 + f)
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    honest = mu + 0.3 * torch.randn(h, d, generator=g, dtype=torch.float64)
    mu_h = honest.mean(dim=0)
    rho = float((honest - mu_h).norm(dim=1).max())
    byz = mu + 1e6 * torch.ones(f, d, dtype=torch.float64) / math.sqrt(d)  # aligned: the worst case
    x = torch.cat([honest[:2], byz, honest[2:]])  # Byzantine rows anywhere in peer-id order
    res = centered_clip(x, "adaptive", lam=1.0)
    assert res.converged
    delta = float((res.value - mu_h).norm())
    q = (f + res.residual / res.tau) / h
    assert delta <= rho * (1 + q) / (1 - q)
    # τ is bracketed by the honest distances, whatever the Byzantine rows do.
    honest_dists = (honest - res.value).norm(dim=1)
    assert float(honest_dists.min()) <= res.tau <= float(honest_dists.max())


def test_adaptive_tau_converges_fast_under_sign_flipping():
    """7 of 16 rows send −1000 × their gradient; honest spread ≈ 31 ≫ τ = 1, so fixed τ = 1 crawls (each step
    moves r by at most ~τ) while the adaptive radius follows the honest spread."""
    x = sign_flip_inputs()
    adaptive = centered_clip(x, "adaptive")
    fixed = centered_clip(x, 1.0)
    assert adaptive.converged and fixed.converged
    assert adaptive.iterations < 50
    assert fixed.iterations > 5 * adaptive.iterations  # measured: 10 vs 423
    honest_mean = x[7:].mean(dim=0)
    mean_error = float((x.mean(dim=0) - honest_mean).norm())
    error = float((adaptive.value - honest_mean).norm())
    rho = float((x[7:] - honest_mean).norm(dim=1).max())
    assert error < 0.01 * mean_error and error < rho  # measured: 9.7 vs 5365 and ρ ≈ 31


def test_max_iter_caps_and_reports_not_converged():
    x = sign_flip_inputs()
    res = centered_clip(x, 1.0, max_iter=5)
    assert not res.converged and res.iterations == 5 and res.passes == 7
    residual, _, _ = reference_residual(x, res.value, 1.0)
    assert residual == pytest.approx(res.residual, rel=1e-4)
    assert centered_clip(x, 1.0, max_iter=0).iterations == 0


def test_nonfinite_rows_are_named():
    x = torch.randn(8, 30, generator=gen(4))
    x[2, 5] = float("nan")
    x[6, 0] = float("inf")
    with pytest.raises(NonFiniteInputError) as err:
        centered_clip(x)
    assert err.value.rows == (2, 6)
    assert "[2, 6]" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_input_is_not_modified_and_float64_stays_float64():
    x = sign_flip_inputs(n=9, d=40, flipped=3, seed=5).double()
    before = x.clone()
    res = centered_clip(x)
    assert torch.equal(x, before)
    assert res.value.dtype == torch.float64


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tau": 0.0},
        {"tau": -1.0},
        {"tau": float("inf")},
        {"tau": "auto"},
        {"tau": "adaptive", "lam": 0.0},
        {"eps_rel": -1.0},
        {"max_iter": -1},
        {"max_iter": 2.5},
    ],
)
def test_bad_parameters_raise(kwargs):
    with pytest.raises(ValueError):
        centered_clip(torch.randn(4, 3, generator=gen(6)), **kwargs)


@pytest.mark.parametrize("bad", [torch.randn(3), torch.randn(0, 4), torch.randn(2, 0)])
def test_bad_shapes_raise(bad):
    with pytest.raises(ValueError):
        centered_clip(bad)


def test_integer_and_half_inputs_are_rejected():
    with pytest.raises(TypeError):
        centered_clip(torch.ones(3, 2, dtype=torch.int64))
    with pytest.raises(TypeError):
        centered_clip(torch.ones(3, 2, dtype=torch.float16))


def test_one_and_two_rows():
    one = torch.randn(1, 6, generator=gen(7))
    for tau in [1.0, "adaptive"]:
        assert torch.equal(centered_clip(one, tau).value, one[0])
    two = torch.randn(2, 6, generator=gen(8), dtype=torch.float64)
    res = centered_clip(two, "adaptive")  # both rows at the same distance from their midpoint: a fixed point
    torch.testing.assert_close(res.value, two.mean(dim=0))
    assert res.iterations == 0 and res.converged


def test_lambda_above_one_lets_colluders_inflate_tau():
    """Why λ defaults to 1: noise-dominated gradients (‖ξ‖ = 2‖μ‖), 7 of 16 rows flip ×1000. With λ = 3 the
    feedback τ ∝ Δ (gain ≈ λ·b/(n − b)·alignment > 1) runs away; with λ = 1 the bound Δ ≤ ρ·n/(n − 2b) holds."""
    g = gen(9)
    d = 20_000
    mu = torch.randn(d, generator=g) / math.sqrt(d)
    x = mu + 2 * torch.randn(16, d, generator=g) / math.sqrt(d)
    honest_mean = x[7:].mean(dim=0)
    x[:7] *= -1000.0

    def error(lam):
        res = centered_clip(x, "adaptive", lam=lam)
        return float((res.value - honest_mean).norm() / honest_mean.norm()), res.tau

    err1, tau1 = error(1.0)
    err3, tau3 = error(3.0)
    assert err1 < 1.0  # measured ≈ 0.76
    assert err3 > 50 * err1 and tau3 > 100 * tau1  # measured ≈ 310 and τ ≈ 1100 vs 2


def test_identical_byzantine_majority_does_not_own_the_aggregate():
    """Issue 11: 7 identical Byzantine rows B among 13 put the median start at B and the median distance at 0;
    without a floor τ = 0 and the result was exactly B. The floor keeps the honest rows' weight positive."""
    g = gen(11)
    honest = torch.randn(6, 200, generator=g) + 1.0
    b = -3.0 * honest.mean(dim=0)
    x = torch.cat([b.repeat(7, 1), honest])
    res = centered_clip(x)
    assert res.converged
    assert not torch.equal(res.value, b)
    assert res.tau >= TAU_FLOOR_REL * float(res.value.double().norm()) * (1 - 1e-12)
    # the result moved from B towards the honest rows
    assert float((res.value.double() - honest.double().mean(0)).norm()) < float((b - honest.mean(0)).norm())
    # and a verifier reproduces τ from the distances and ‖r‖
    dists = (x.double() - res.value.double()).norm(dim=1)
    t, w = clip_weights(dists, "adaptive", ref_norm=float(res.value.double().norm()))
    assert t == pytest.approx(res.tau, rel=1e-6)
    assert float((w @ (x.double() - res.value.double())).norm()) <= 13 * 1e-4 * t * 1.01 + 1e-5 * float(
        w @ dists
    )


def test_floor_bias_is_bounded_with_an_honest_majority():
    """Honest rows all identical (ρ = 0), 7 of 16 Byzantine rows far away: the floor is active and the bias
    stays below (α‖μ‖ + τ_abs)/(1 − α), the bound of the docstring."""
    mu = torch.randn(300, generator=gen(12), dtype=torch.float64)
    x = mu.repeat(16, 1)
    x[:7] = -1e6 * mu + torch.randn(7, 300, generator=gen(13), dtype=torch.float64)
    res = centered_clip(x)
    assert res.converged
    bias = float((res.value - mu).norm())
    assert 0 < bias <= (TAU_FLOOR_REL * float(mu.norm()) + TAU_FLOOR_ABS) / (1 - TAU_FLOOR_REL)


def test_floor_does_not_change_ordinary_results():
    """On spread-out rows (honest distances ≫ 10⁻³‖r‖) the floor is inactive: τ is λ·median distance."""
    x = sign_flip_inputs(n=16, d=300, seed=4)
    res = centered_clip(x)
    dists = (x.double() - res.value.double()).norm(dim=1)
    s = torch.sort(dists).values
    assert res.tau == pytest.approx(float((s[7] + s[8]) / 2), rel=1e-6)
