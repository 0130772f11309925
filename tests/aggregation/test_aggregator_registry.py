"""Registry: names, configuration, errors."""

import dataclasses

import pytest
import torch

from btard.aggregation import (
    AGGREGATORS,
    CClipResult,
    CenteredClip,
    Krum,
    TrimmedMean,
    centered_clip,
    get_aggregator,
)


def test_registered_names():
    assert set(AGGREGATORS) == {"cclip", "mean", "median", "trimmed-mean", "krum", "geomedian"}
    with pytest.raises(TypeError):
        AGGREGATORS["evil"] = CenteredClip  # read-only table


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError) as err:
        get_aggregator("bulyan")
    for name in AGGREGATORS:
        assert name in str(err.value)


def test_rules_are_configured_frozen_callables():
    x = torch.randn(9, 20, generator=torch.Generator().manual_seed(0))
    rule = get_aggregator("cclip", tau=1.0)
    assert isinstance(rule, CenteredClip) and rule.tau == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.tau = 2.0
    assert torch.equal(rule(x), centered_clip(x, 1.0).value)
    assert isinstance(rule.run(x), CClipResult)
    assert get_aggregator("krum", f=2, m=3) == Krum(f=2, m=3)
    assert torch.equal(get_aggregator("trimmed-mean", f=2)(x), TrimmedMean(2)(x))


@pytest.mark.parametrize(
    "name, params",
    [
        ("cclip", {"tau": -1.0}),
        ("cclip", {"max_iter": -3}),
        ("trimmed-mean", {"f": -1}),
        ("krum", {"f": 1, "m": 0}),
        ("geomedian", {"nu": 0.0}),
    ],
)
def test_bad_configuration_fails_at_construction(name, params):
    with pytest.raises(ValueError):
        get_aggregator(name, **params)


def test_unknown_parameter_is_a_type_error():
    with pytest.raises(TypeError):
        get_aggregator("mean", f=3)
