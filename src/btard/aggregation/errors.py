"""Errors raised by the aggregation rules."""

from __future__ import annotations

from collections.abc import Iterable


class NonFiniteInputError(ValueError):
    """Some input rows hold NaN or ±Inf; `rows` names them (0-based, ascending, in peer-id order).

    A row with a non-finite value is provable misbehaviour of its sender (protocol §6), so the rules refuse to
    aggregate it instead of silently propagating NaN.
    """

    def __init__(self, rows: Iterable[int]) -> None:
        self.rows: tuple[int, ...] = tuple(sorted(int(i) for i in rows))
        super().__init__(f"non-finite values (NaN or Inf) in input rows {list(self.rows)}")
