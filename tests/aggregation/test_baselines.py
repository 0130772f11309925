"""Baseline rules and the invariances every rule must have."""

import itertools

import pytest
import torch

from btard.aggregation import (
    AGGREGATORS,
    NonFiniteInputError,
    coordinate_median,
    geometric_median,
    get_aggregator,
    krum,
    mean,
    trimmed_mean,
    weiszfeld,
)

# Every registered rule, configured as in the paper's experiments (n = 16 rows below, 7 possibly Byzantine).
RULES = {
    "mean": {},
    "median": {},
    "trimmed-mean": {"f": 3},
    "krum": {"f": 5},
    "multi-krum": {"f": 5, "m": 4},
    "geomedian": {},
    "cclip-1": {"tau": 1.0},
    "cclip-adaptive": {"tau": "adaptive"},
}


def rule(label: str):
    name = "krum" if label == "multi-krum" else label.split("-")[0] if label.startswith("cclip") else label
    return get_aggregator(name, **RULES[label])


def inputs(n=16, d=40, seed=0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    x[:3] = 50.0 * torch.randn(
        3, d, generator=g, dtype=dtype
    )  # a few outliers so rules disagree with the mean
    return x


def test_rules_cover_the_registry():
    assert {rule(label).__class__ for label in RULES} == set(AGGREGATORS.values())


@pytest.mark.parametrize("label", list(RULES))
def test_permutation_invariance(label):
    x = inputs()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))
    agg = rule(label)
    torch.testing.assert_close(agg(x[perm]), agg(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("label", list(RULES))
def test_translation_equivariance(label):
    x = inputs(seed=2)
    c = 10.0 * torch.randn(x.shape[1], generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    agg = rule(label)
    torch.testing.assert_close(agg(x + c), agg(x) + c, rtol=0, atol=1e-6)


@pytest.mark.parametrize("label", list(RULES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_and_input_untouched(label, dtype):
    x = inputs(dtype=dtype, seed=4)
    before = x.clone()
    out = rule(label)(x)
    assert out.shape == (x.shape[1],) and out.dtype == dtype
    assert torch.equal(x, before)


@pytest.mark.parametrize("label", list(RULES))
def test_nonfinite_rows_are_named_by_every_rule(label):
    x = inputs(seed=5)
    x[4, 7] = float("nan")
    x[11, 0] = float("-inf")
    with pytest.raises(NonFiniteInputError) as err:
        rule(label)(x)
    assert err.value.rows == (4, 11)
    assert "[4, 11]" in str(err.value)


def test_mean_by_hand():
    assert mean(torch.tensor([[0.0, 2.0], [2.0, 4.0], [4.0, 0.0]])).tolist() == [2.0, 2.0]


def test_median_odd_and_even_by_hand():
    x = torch.tensor([[3.0, -1.0], [1.0, 10.0], [2.0, 0.0]])
    assert coordinate_median(x).tolist() == [2.0, 0.0]
    x = torch.tensor([[0.0, 4.0], [1.0, 3.0], [5.0, 2.0], [9.0, 1.0]])
    assert coordinate_median(x).tolist() == [3.0, 2.5]  # even n: mean of the two middle values
    assert coordinate_median(torch.tensor([[7.0, -2.0]])).tolist() == [7.0, -2.0]


def test_median_matches_torch_quantile_on_random_data():
    for n in range(1, 20):
        x = torch.randn(n, 33, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        torch.testing.assert_close(coordinate_median(x), torch.quantile(x, 0.5, dim=0))


def test_trimmed_mean_by_hand():
    x = torch.tensor([[0.0, 10.0], [1.0, 20.0], [2.0, 30.0], [100.0, -40.0], [3.0, 0.0]])
    # column 0 sorted: 0 1 2 3 100 → drop 0 and 100; column 1: -40 0 10 20 30 → drop -40 and 30
    assert trimmed_mean(x, 1).tolist() == [2.0, 10.0]
    assert trimmed_mean(x, 2).tolist() == [2.0, 10.0]
    torch.testing.assert_close(trimmed_mean(x, 0), x.mean(dim=0))
    for bad in [3, -1]:
        with pytest.raises(ValueError):
            trimmed_mean(x, bad)


def test_trimmed_mean_matches_sorting():
    x = torch.randn(16, 50, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    for f in range(8):
        torch.testing.assert_close(trimmed_mean(x, f), torch.sort(x, dim=0).values[f : 16 - f].mean(dim=0))


def test_krum_by_hand():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [10.0, 10.0], [11.0, 10.0]])
    # f = 1: each score sums the n − f − 2 = 2 smallest squared distances to the others:
    # row 0: 1 + 4 = 5, row 1: 1 + 5 = 6, row 2: 4 + 5 = 9, row 3: 1 + 164 = 165, row 4: 1 + 181 = 182
    assert krum(x, 1).tolist() == [0.0, 0.0]
    assert krum(x, 1, m=2).tolist() == [0.5, 0.0]  # multi-Krum: mean of rows 0 and 1
    assert krum(x, 1, m=3).tolist() == pytest.approx([1 / 3, 2 / 3])


def test_krum_ties_go_to_the_lower_index():
    x = torch.tensor([[0.0], [1.0], [2.0], [100.0]])
    # f = 1, one neighbour: rows 0, 1, 2 all score 1
    assert krum(x, 1).tolist() == [0.0]
    assert krum(x[[2, 1, 0, 3]], 1).tolist() == [2.0]
    assert krum(x, 1, m=2).tolist() == [0.5]


def test_krum_parameter_checks():
    x = torch.zeros(5, 2)
    for f, m in [(3, 1), (-1, 1), (1, 0), (1, 6)]:
        with pytest.raises(ValueError):
            krum(x, f, m)


def test_geometric_median_by_hand():
    collinear = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(geometric_median(collinear), torch.tensor([1.0, 0.0], dtype=torch.float64))
    square = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    torch.testing.assert_close(geometric_median(square), torch.tensor([0.5, 0.5]))


def test_geometric_median_minimises_the_sum_of_distances():
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x[0] += 20.0
    gm = geometric_median(x)

    def objective(r):
        return float((x - r).norm(dim=1).sum())

    best = objective(gm)
    for dx in itertools.product([-1e-3, 0.0, 1e-3], repeat=3):
        assert best <= objective(gm + torch.tensor(dx, dtype=torch.float64)) + 1e-12
    # first-order optimality: the unit vectors towards the points sum to ~0
    units = (x - gm) / (x - gm).norm(dim=1, keepdim=True)
    assert float(units.sum(dim=0).norm()) < 1e-6


def test_geometric_median_parameter_checks():
    with pytest.raises(ValueError):
        geometric_median(torch.zeros(3, 2), nu=0.0)
    with pytest.raises(ValueError):
        geometric_median(torch.zeros(3, 2), max_iter=-1)


def test_weiszfeld_reports_iterations_and_convergence():
    collinear = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
    res = weiszfeld(collinear)
    assert res.converged and 1 <= res.iterations < 100
    capped = weiszfeld(collinear, max_iter=0)
    assert not capped.converged and capped.iterations == 0
    torch.testing.assert_close(capped.value, collinear.mean(dim=0))
    x = torch.randn(16, 500, generator=torch.Generator().manual_seed(8))  # float32: stops at its resolution
    assert weiszfeld(x).converged
