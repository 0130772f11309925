"""Finite inputs of any magnitude never crash a rule and give a finite, deterministic result (issue 11)."""

import math

import pytest
import torch

from btard.aggregation import (
    NonFiniteInputError,
    centered_clip,
    clip_weights,
    coordinate_median,
    geometric_median,
    krum,
    mean,
    trimmed_mean,
)

F32_MAX = torch.finfo(torch.float32).max


def honest(n=16, d=1000, seed=0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) + 0.5).to(dtype)


def sign_flip(k: float, d=1000, seed=0) -> torch.Tensor:
    x = honest(d=d, seed=seed)
    x[:7] *= -k
    return x


def near_max_both_signs() -> torch.Tensor:
    x = honest()
    x[0] = F32_MAX
    x[1] = -F32_MAX
    x[2, ::2] = F32_MAX
    x[2, 1::2] = -F32_MAX
    return x


def majority_near_max() -> torch.Tensor:
    x = honest()
    x[:9] = 0.9 * F32_MAX  # the two middle values of every column sum beyond float32's range
    return x


def tiny_and_huge() -> torch.Tensor:
    x = honest() * 1e-30  # honest rows at 1e-30: their squares underflow float32
    x[:5] = 1e38 * torch.sign(honest(seed=1)[:5])
    return x


def huge_float64() -> torch.Tensor:
    x = honest(dtype=torch.float64) * 1e300
    x[:3] = -1.7e308
    return x


INPUTS = {
    "signflip-1e25": lambda: sign_flip(1e25),
    "signflip-1e36": lambda: sign_flip(1e36),
    "near-max-both-signs": near_max_both_signs,
    "tiny-and-huge": tiny_and_huge,
    "majority-near-max": majority_near_max,
    "float64-1e300": huge_float64,
    "multi-chunk-1e30": lambda: sign_flip(1e30, d=40_000),
}

RULES = {
    "cclip-adaptive": lambda x: centered_clip(x).value,
    "cclip-tau": lambda x: centered_clip(x, 1.0).value,
    "mean": mean,
    "median": coordinate_median,
    "trimmed-mean": lambda x: trimmed_mean(x, 7),
    "krum": lambda x: krum(x, 7),
    "multi-krum": lambda x: krum(x, 7, m=4),
    "geomedian": geometric_median,
}


@pytest.mark.parametrize("inputs", sorted(INPUTS))
@pytest.mark.parametrize("rule", sorted(RULES))
def test_finite_inputs_of_any_magnitude_give_a_finite_deterministic_result(rule, inputs):
    x = INPUTS[inputs]()
    assert bool(torch.isfinite(x).all())
    before = x.clone()
    a = RULES[rule](x)
    b = RULES[rule](x)
    assert a.dtype == x.dtype and a.shape == (x.shape[1],)
    assert bool(torch.isfinite(a).all())
    assert torch.equal(a, b)  # bit-identical across calls
    assert torch.equal(x, before)


def test_sign_flip_1e25_is_clipped_like_any_sign_flip():
    """The issue's case: float32 squared distances overflowed and CenteredClip raised ValueError."""
    x = sign_flip(1e25)
    res = centered_clip(x)
    assert res.converged and math.isfinite(res.tau) and math.isfinite(res.residual)
    target = x[7:].double().mean(dim=0)
    assert float((res.value.double() - target).norm() / target.norm()) < 1.5
    assert res.residual <= 16 * 1e-4 * res.tau * 1.01


def test_tiny_honest_rows_keep_their_aggregate_next_to_huge_rows():
    x = tiny_and_huge()
    target = x[5:].double().mean(dim=0)
    err = float((centered_clip(x).value.double() - target).norm() / target.norm())
    assert err < 0.01, err


def test_distances_are_accurate_at_both_ends_of_the_float32_range():
    x = tiny_and_huge()
    res = centered_clip(x)
    dists = (x.double() - res.value.double()).norm(dim=1)
    assert bool(torch.isfinite(dists).all())
    t, _ = clip_weights(dists, "adaptive", ref_norm=float(res.value.double().norm()))
    assert t == pytest.approx(res.tau, rel=1e-5)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_non_finite_rows_still_raise_next_to_huge_finite_rows(rule):
    x = near_max_both_signs()
    x[9, 3] = float("nan")
    x[11, 0] = float("inf")
    with pytest.raises(NonFiniteInputError) as info:
        RULES[rule](x)
    assert info.value.rows == (9, 11)
