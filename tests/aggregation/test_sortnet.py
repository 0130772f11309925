"""Comparator networks: exhaustive 0-1-principle checks (a comparator network sorts/selects every input iff it
does so for every 0-1 input)."""

import itertools

import numpy as np
import pytest

from btard.aggregation._sortnet import median_ranks, selection_network, sorting_network


def all_binary_inputs(n: int) -> np.ndarray:
    return ((np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1).astype(np.int8)


def apply(network, values: np.ndarray) -> np.ndarray:
    v = values.copy()
    for i, j in network:
        lo, hi = np.minimum(v[:, i], v[:, j]), np.maximum(v[:, i], v[:, j])
        v[:, i], v[:, j] = lo, hi
    return v


@pytest.mark.parametrize("n", range(1, 17))
def test_sorting_network_sorts_every_binary_input(n):
    net = sorting_network(n)
    assert all(0 <= i < j < n for i, j in net)
    inputs = all_binary_inputs(n)
    np.testing.assert_array_equal(apply(net, inputs), np.sort(inputs, axis=1))


@pytest.mark.parametrize("n", range(1, 17))
def test_pruned_median_network_selects_the_middle_ranks(n):
    ranks, _ = median_ranks(n)
    net = selection_network(n, ranks)
    inputs = all_binary_inputs(n)
    np.testing.assert_array_equal(apply(net, inputs)[:, ranks], np.sort(inputs, axis=1)[:, ranks])


def test_pruning_removes_comparators_for_the_median_of_16():
    assert len(sorting_network(16)) == 63
    assert len(selection_network(16, [7, 8])) == 53


def test_trimmed_ranks_on_random_real_inputs():
    rng = np.random.default_rng(0)
    for n, f in itertools.product([5, 9, 16, 17], [0, 1, 2]):
        ranks = list(range(f, n - f))
        values = rng.normal(size=(200, n))
        got = apply(selection_network(n, ranks), values)[:, ranks]
        np.testing.assert_array_equal(got, np.sort(values, axis=1)[:, ranks])


def test_median_convention():
    assert median_ranks(5) == ([2], 1.0)
    assert median_ranks(16) == ([7, 8], 0.5)
