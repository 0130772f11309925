"""Aggregation rules for Byzantine-tolerant training: CenteredClip (protocol §4) and baselines.

Every rule takes an (n, d) float32/float64 tensor whose rows are the peers' vectors in peer-id order and returns
a (d,) tensor of the same dtype; inputs are never modified; NaN/Inf rows raise `NonFiniteInputError`.
"""

from btard.aggregation.baselines import (
    WeiszfeldResult,
    coordinate_median,
    geometric_median,
    krum,
    mean,
    trimmed_mean,
    weiszfeld,
)
from btard.aggregation.centered_clip import CClipResult, centered_clip, clip_weights
from btard.aggregation.errors import NonFiniteInputError
from btard.aggregation.registry import (
    AGGREGATORS,
    Aggregator,
    CenteredClip,
    CoordinateMedian,
    GeometricMedian,
    Krum,
    Mean,
    TrimmedMean,
    get_aggregator,
)

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "CClipResult",
    "CenteredClip",
    "CoordinateMedian",
    "GeometricMedian",
    "Krum",
    "Mean",
    "NonFiniteInputError",
    "TrimmedMean",
    "WeiszfeldResult",
    "centered_clip",
    "clip_weights",
    "coordinate_median",
    "geometric_median",
    "get_aggregator",
    "krum",
    "mean",
    "trimmed_mean",
    "weiszfeld",
]
