"""Input validation shared by the aggregation rules."""

from __future__ import annotations

import torch
from torch import Tensor

from btard.aggregation.errors import NonFiniteInputError

SUPPORTED_DTYPES = (torch.float32, torch.float64)


def as_matrix(x: Tensor) -> Tensor:
    """Return `x` unchanged after checking it is a non-empty (n, d) float32/float64 tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"expected an (n, d) tensor, got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"expected at least one row and one column, got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"expected float32 or float64 input, got {x.dtype}")
    return x


def nonfinite_rows(x: Tensor, suspects: Tensor | None = None) -> list[int]:
    """Indices of the rows of `x` holding NaN/Inf, examining only rows flagged in `suspects` (bool, (n,))."""
    candidates = range(x.shape[0]) if suspects is None else suspects.nonzero().flatten().tolist()
    return [int(i) for i in candidates if not bool(torch.isfinite(x[i]).all())]


def ensure_finite(x: Tensor, suspects: Tensor | None = None) -> None:
    """Raise `NonFiniteInputError` naming every non-finite row among `suspects` (all rows when None).

    Callers pass as suspects the rows whose cheap per-row summary (a float64 sum or norm computed in a pass they
    make anyway) is not finite: a row with NaN/Inf always yields a non-finite summary, so no row is missed, and
    the exact check runs only on the flagged rows.
    """
    if suspects is not None and not bool(suspects.any()):
        return
    rows = nonfinite_rows(x, suspects)
    if rows:
        raise NonFiniteInputError(rows)
