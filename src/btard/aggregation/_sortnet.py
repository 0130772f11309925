"""Comparator networks that select column-wise order statistics of an (n, d) matrix.

`torch.sort`/`torch.median` along dim 0 of a (16, 11.2M) CPU matrix take seconds (they sort 11.2M tiny columns
one at a time); a comparator network instead runs as two element-wise min/max ops per comparator over whole
rows of a cache-resident chunk, an order of magnitude faster. The results are exact order statistics.
"""

from __future__ import annotations

from collections.abc import Sequence


def sorting_network(n: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sort network for any n ≥ 1: comparators (i, j), i < j, applied in order.

    Applying every comparator (smaller value to wire i, larger to wire j) leaves the wires in ascending order for
    every input (checked exhaustively with the 0-1 principle in the tests).
    """
    pairs: list[tuple[int, int]] = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


def selection_network(n: int, ranks: Sequence[int]) -> list[tuple[int, int]]:
    """The comparators of `sorting_network(n)` that can influence the output wires `ranks` (the rest pruned).

    Wire r then holds the r-th smallest input (0-based) for every r in `ranks`. For the median of 16 this keeps
    53 of 63 comparators.
    """
    needed = set(ranks)
    kept: list[tuple[int, int]] = []
    for a, b in reversed(sorting_network(n)):
        if a in needed or b in needed:
            kept.append((a, b))
            needed.update((a, b))
    kept.reverse()
    return kept


def median_ranks(n: int) -> tuple[list[int], float]:
    """Ranks (0-based) and scale of the median convention: the middle value for odd n, and the mean of the two
    middle values, (v_(n/2−1) + v_(n/2)) / 2, for even n."""
    if n % 2:
        return [n // 2], 1.0
    return [n // 2 - 1, n // 2], 0.5
