"""Aggregation rules as small configured callables, and a name → factory table.

Each rule is a frozen dataclass configured once (`TrimmedMean(f=7)`) and called on an (n, d) tensor whose rows
are in peer-id order, returning a (d,) tensor; it keeps no state between calls.

>>> import torch
>>> rule = get_aggregator("trimmed-mean", f=1)
>>> rule(torch.tensor([[0.0], [1.0], [2.0], [100.0]]))
tensor([1.5000])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from torch import Tensor

from btard.aggregation.baselines import coordinate_median, geometric_median, krum, mean, trimmed_mean
from btard.aggregation.centered_clip import (
    ADAPTIVE,
    DEFAULT_LAM,
    CClipResult,
    Tau,
    centered_clip,
    validate_tau,
)


class Aggregator(Protocol):
    def __call__(self, x: Tensor) -> Tensor: ...


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class CenteredClip:
    """CenteredClip over the full vectors (a trusted server); see `centered_clip`."""

    tau: Tau = ADAPTIVE
    lam: float = DEFAULT_LAM
    eps_rel: float = 1e-4
    max_iter: int = 1000

    def __post_init__(self) -> None:
        validate_tau(self.tau, self.lam)
        _check_int("max_iter", self.max_iter, 0)

    def run(self, x: Tensor) -> CClipResult:
        """The full result (value, iterations, residual, τ, ...)."""
        return centered_clip(x, self.tau, lam=self.lam, eps_rel=self.eps_rel, max_iter=self.max_iter)

    def __call__(self, x: Tensor) -> Tensor:
        return self.run(x).value


@dataclass(frozen=True)
class Mean:
    """Coordinate-wise mean (no defence)."""

    def __call__(self, x: Tensor) -> Tensor:
        return mean(x)


@dataclass(frozen=True)
class CoordinateMedian:
    """Coordinate-wise median (mean of the two middle values for even n)."""

    def __call__(self, x: Tensor) -> Tensor:
        return coordinate_median(x)


@dataclass(frozen=True)
class TrimmedMean:
    """Coordinate-wise mean without the f largest and f smallest values (needs 2f < n)."""

    f: int

    def __post_init__(self) -> None:
        _check_int("f", self.f, 0)

    def __call__(self, x: Tensor) -> Tensor:
        return trimmed_mean(x, self.f)


@dataclass(frozen=True)
class Krum:
    """Krum (m = 1) or multi-Krum (mean of the m best-scored rows), f assumed Byzantine rows."""

    f: int
    m: int = 1

    def __post_init__(self) -> None:
        _check_int("f", self.f, 0)
        _check_int("m", self.m, 1)

    def __call__(self, x: Tensor) -> Tensor:
        return krum(x, self.f, self.m)


@dataclass(frozen=True)
class GeometricMedian:
    """Geometric median by smoothed Weiszfeld iterations."""

    eps: float = 1e-8
    max_iter: int = 100
    nu: float = 1e-8

    def __post_init__(self) -> None:
        _check_int("max_iter", self.max_iter, 0)
        if not (self.eps >= 0 and self.nu > 0):
            raise ValueError(f"need eps >= 0 and nu > 0, got eps={self.eps!r}, nu={self.nu!r}")

    def __call__(self, x: Tensor) -> Tensor:
        return geometric_median(x, eps=self.eps, max_iter=self.max_iter, nu=self.nu)


AGGREGATORS: Mapping[str, Callable[..., Aggregator]] = MappingProxyType(
    {
        "cclip": CenteredClip,
        "mean": Mean,
        "median": CoordinateMedian,
        "trimmed-mean": TrimmedMean,
        "krum": Krum,
        "geomedian": GeometricMedian,
    }
)


def get_aggregator(name: str, **params: object) -> Aggregator:
    """The rule registered under `name`, configured with `params`; ValueError listing the names if unknown."""
    try:
        factory = AGGREGATORS[name]
    except KeyError:
        raise ValueError(f"unknown aggregator {name!r}; known: {', '.join(sorted(AGGREGATORS))}") from None
    return factory(**params)
