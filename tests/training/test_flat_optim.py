"""The flat functional optimizers reproduce torch.optim bit for bit and checkpoint their state."""

import math

import pytest
import torch

from btard.training import (
    AdamConfig,
    ConstantSchedule,
    CosineSchedule,
    FlatAdam,
    FlatSGD,
    SGDConfig,
    make_optimizer,
)


def _problem(seed: int = 0, d: int = 37):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g) / math.sqrt(d)
    b = torch.randn(d, generator=g)
    x0 = torch.randn(d, generator=g)

    def grad(x: torch.Tensor) -> torch.Tensor:  # gradient of 0.5 * ||A x - b||^2
        return a.T @ (a @ x - b)

    return x0, grad


@pytest.mark.parametrize(
    "momentum,nesterov,wd,dampening",
    [(0.0, False, 0.0, 0.0), (0.9, False, 0.0, 0.0), (0.9, True, 5e-4, 0.0), (0.5, False, 1e-2, 0.3)],
)
def test_sgd_matches_torch_sgd_with_cosine_schedule(momentum, nesterov, wd, dampening):
    x0, grad = _problem()
    total = 12
    cfg = SGDConfig(0.1, momentum, nesterov, wd, dampening, schedule=CosineSchedule(total))
    ours = FlatSGD(cfg)
    p = torch.nn.Parameter(x0.clone())
    ref = torch.optim.SGD(
        [p], lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd, dampening=dampening, foreach=False
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref, T_max=total)
    x = x0.clone()
    for t in range(total):
        g = grad(x)
        # the schedule agrees with torch's CosineAnnealingLR (which computes it recursively, so up to
        # rounding) ...
        assert ours.lr(t) == pytest.approx(sched.get_last_lr()[0], rel=1e-9, abs=1e-15)
        # ... and with the same learning rate the update is the same, bit for bit
        ref.param_groups[0]["lr"] = ours.lr(t)
        x = ours.step(x, g, t)
        p.grad = g.clone()
        ref.step()
        sched.step()
        assert torch.equal(x, p.detach()), f"step {t}"


def test_adam_matches_torch_adam():
    x0, grad = _problem(1)
    ours = FlatAdam(AdamConfig(0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=1e-3))
    p = torch.nn.Parameter(x0.clone())
    ref = torch.optim.Adam([p], lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=1e-3, foreach=False)
    x = x0.clone()
    for t in range(10):
        g = grad(x)
        x = ours.step(x, g, t)
        p.grad = g.clone()
        ref.step()
        torch.testing.assert_close(x, p.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "cfg", [SGDConfig(0.05, 0.9, True, 1e-4, schedule=CosineSchedule(20, warmup_steps=3)), AdamConfig(0.01)]
)
def test_state_dict_resumes_bit_identically_and_inputs_are_untouched(cfg):
    x0, grad = _problem(2)
    a = make_optimizer(cfg)
    assert a.state_dict() == {}
    x = x0.clone()
    for t in range(4):
        x = a.step(x, grad(x), t)
    state = a.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values()) and state
    b = make_optimizer(cfg)
    b.load_state_dict(state)
    xa, xb = x.clone(), x.clone()
    for t in range(4, 9):
        g = grad(xa)
        g_copy, xa_copy = g.clone(), xa.clone()
        xa = a.step(xa, g, t)
        assert torch.equal(g, g_copy) and not torch.equal(xa, xa_copy)
        xb = b.step(xb, grad(xb), t)
    assert torch.equal(xa, xb)
    state["extra"] = torch.zeros(1)
    with pytest.raises(ValueError):
        make_optimizer(cfg).load_state_dict(state)


def test_cosine_schedule_values():
    s = CosineSchedule(100)
    assert s.factor(0) == 1.0 and s.factor(100) == 0.0 and s.factor(1000) == 0.0
    assert s.factor(50) == pytest.approx(0.5)
    w = CosineSchedule(100, warmup_steps=10, min_factor=0.1)
    assert w.factor(0) == pytest.approx(0.1) and w.factor(9) == pytest.approx(1.0)
    assert w.factor(10) == pytest.approx(1.0) and w.factor(100) == pytest.approx(0.1)
    assert ConstantSchedule().factor(7) == 1.0
    with pytest.raises(ValueError):
        s.factor(-1)


def test_config_validation():
    with pytest.raises(ValueError):
        SGDConfig(0.1, momentum=0.0, nesterov=True)
    with pytest.raises(ValueError):
        AdamConfig(0.1, betas=(0.9, 1.0))
    with pytest.raises(ValueError):
        FlatSGD(SGDConfig(0.1)).step(torch.zeros(3), torch.zeros(4), 0)
