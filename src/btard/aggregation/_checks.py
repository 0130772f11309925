"""Input validation shared by the aggregation rules."""

from __future__ import annotations

import math

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


# Inputs are scaled so that max|x| ≤ 2^WIDE_EXP before float64 arithmetic: differences stay ≤ 2^(WIDE_EXP+1),
# and a sum of 2^63 of their squares ≤ 2^(2·WIDE_EXP+65) < 2^1024 cannot overflow. Float32 inputs (< 2^128)
# are never scaled.
WIDE_EXP = 448


def widened(x: Tensor) -> tuple[Tensor, int]:
    """(x in float64 scaled by 2^-shift, shift ≥ 0): the fallback of the rules when arithmetic in x's dtype
    overflows on finite inputs. Scaling by a power of two is exact (except for entries pushed below float64's
    normal range, which are then negligible next to the largest); x is not modified."""
    wide = x.to(torch.float64)
    lo, hi = torch.aminmax(wide)
    amax = max(-float(lo), float(hi))
    shift = 0
    if amax > 2.0**WIDE_EXP:
        shift = math.frexp(amax)[1] - WIDE_EXP
        wide = wide * 2.0**-shift
    return wide, shift


def narrowed(value: Tensor, shift: int, dtype: torch.dtype) -> Tensor:
    """A result computed on `widened(x)` back in x's scale and dtype, clamped to the dtype's finite range (the
    rules' results lie in the inputs' hull, so the clamp only catches rounding at the edge of the range)."""
    out = value * 2.0**shift if shift else value
    fmax = torch.finfo(dtype).max
    return out.to(dtype).clamp_(-fmax, fmax)
