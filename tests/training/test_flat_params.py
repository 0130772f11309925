"""Flat parameter/gradient vectors in a fixed order."""

import pytest
import torch
from torch import nn

from btard.training import ParamLayout, flat_grad, flat_params, set_flat_params


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_flat_params_order_and_roundtrip():
    m = _model()
    flat = flat_params(m)
    expected = torch.cat([m[0].weight.reshape(-1), m[0].bias, m[2].weight.reshape(-1), m[2].bias]).detach()
    assert torch.equal(flat, expected) and flat.dtype == torch.float32
    layout = ParamLayout.of(m)
    assert layout.dim == 3 * 4 + 4 + 4 * 2 + 2
    assert layout.names == ("0.weight", "0.bias", "2.weight", "2.bias")
    new = torch.arange(layout.dim, dtype=torch.float32)
    set_flat_params(m, new)
    assert torch.equal(flat_params(m), new)
    views = layout.unflatten(new)
    assert torch.equal(views["2.bias"], new[-2:]) and views["0.weight"].shape == (4, 3)
    assert torch.equal(layout.flatten(views), new)


def test_flat_params_is_a_copy():
    m = _model()
    flat = flat_params(m)
    flat.zero_()
    assert float(m[0].weight.detach().abs().sum()) > 0


def test_flat_grad_matches_autograd_and_fills_missing_with_zeros():
    m = _model()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    m(x).sum().backward()
    g = flat_grad(m)
    assert torch.equal(g[:12], m[0].weight.grad.reshape(-1))
    m[2].bias.grad = None
    assert torch.equal(flat_grad(m)[-2:], torch.zeros(2))


def test_set_flat_params_validates():
    m = _model()
    with pytest.raises(ValueError):
        set_flat_params(m, torch.zeros(5))
    with pytest.raises(ValueError):
        set_flat_params(m, torch.zeros(ParamLayout.of(m).dim, dtype=torch.float64))
    with pytest.raises(ValueError):
        ParamLayout.of(m).unflatten(torch.zeros(3, 3))
