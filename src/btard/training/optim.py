"""Deterministic functional optimizers on flat float tensors (protocol §3 step 9).

Every honest peer applies x^{t+1} = opt.step(x^t, ĝ, t) with the same state and gets the same bits: the update
is a fixed sequence of elementwise torch ops that mirrors ``torch.optim.SGD`` / ``torch.optim.Adam``
(single-tensor path) operation for operation. The state is a dict of tensors, for checkpoints and for joiners
(protocol §8). Inputs are never modified in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

__all__ = [
    "AdamConfig",
    "ConstantSchedule",
    "CosineSchedule",
    "FlatAdam",
    "FlatOptimizer",
    "FlatSGD",
    "LRSchedule",
    "OptimizerConfig",
    "SGDConfig",
    "make_optimizer",
]


class LRSchedule(Protocol):
    """Maps a step t ≥ 0 to a factor that multiplies the base learning rate."""

    def factor(self, step: int) -> float: ...


@dataclass(frozen=True)
class ConstantSchedule:
    """Factor 1 at every step."""

    def factor(self, step: int) -> float:
        _check_step(step)
        return 1.0


@dataclass(frozen=True)
class CosineSchedule:
    """Linear warm-up over ``warmup_steps``, then cosine decay from 1 to ``min_factor`` at ``total_steps``.

    Without warm-up this is ``torch.optim.lr_scheduler.CosineAnnealingLR`` with T_max = total_steps and
    eta_min = min_factor · lr: factor(t) = m + (1 − m)(1 + cos(π t / T)) / 2, and m after T.
    """

    total_steps: int
    warmup_steps: int = 0
    min_factor: float = 0.0

    def __post_init__(self) -> None:
        if self.total_steps < 1 or not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError("need total_steps >= 1 and 0 <= warmup_steps < total_steps")
        if not 0.0 <= self.min_factor <= 1.0:
            raise ValueError("min_factor must be in [0, 1]")

    def factor(self, step: int) -> float:
        _check_step(step)
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if step >= self.total_steps:
            return self.min_factor
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.min_factor + (1.0 - self.min_factor) * (1.0 + math.cos(math.pi * progress)) / 2.0


def _check_step(step: int) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")


@dataclass(frozen=True)
class SGDConfig:
    """SGD with optional (Nesterov) momentum and L2 weight decay, as ``torch.optim.SGD``."""

    lr: float
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    dampening: float = 0.0
    schedule: LRSchedule = field(default_factory=ConstantSchedule)

    def __post_init__(self) -> None:
        if self.lr < 0 or self.momentum < 0 or self.weight_decay < 0:
            raise ValueError("lr, momentum and weight_decay must be >= 0")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("Nesterov momentum requires momentum > 0 and zero dampening")


@dataclass(frozen=True)
class AdamConfig:
    """Adam with L2 weight decay (not AdamW), as ``torch.optim.Adam``."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: LRSchedule = field(default_factory=ConstantSchedule)

    def __post_init__(self) -> None:
        if self.lr < 0 or self.eps < 0 or self.weight_decay < 0:
            raise ValueError("lr, eps and weight_decay must be >= 0")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError("betas must be in [0, 1)")


OptimizerConfig = SGDConfig | AdamConfig


class FlatOptimizer(Protocol):
    """The update rule every peer applies identically; ``step`` returns new parameters."""

    config: OptimizerConfig

    def lr(self, step: int) -> float: ...

    def step(self, params: Tensor, grad: Tensor, step: int) -> Tensor: ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...


def _check_pair(params: Tensor, grad: Tensor) -> None:
    if params.dim() != 1 or params.shape != grad.shape or params.dtype != grad.dtype:
        raise ValueError(
            "params and grad must be flat with equal shape and dtype, got "
            f"{tuple(params.shape)} {params.dtype} and {tuple(grad.shape)} {grad.dtype}"
        )


def _check_state(state: dict[str, Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    if set(state) != set(expected):
        raise ValueError(f"optimizer state must have keys {sorted(expected)}, got {sorted(state)}")
    for key, shape in expected.items():
        if not isinstance(state[key], Tensor) or tuple(state[key].shape) != shape:
            raise ValueError(f"optimizer state {key!r} must be a tensor of shape {shape}")


class FlatSGD:
    """``torch.optim.SGD`` on one flat tensor; state: ``{"momentum_buffer"}`` once a momentum step ran."""

    def __init__(self, config: SGDConfig) -> None:
        self.config = config
        self._buf: Tensor | None = None

    def lr(self, step: int) -> float:
        """The learning rate used at ``step``."""
        return self.config.lr * self.config.schedule.factor(step)

    def step(self, params: Tensor, grad: Tensor, step: int) -> Tensor:
        """Return x − lr(step)·d, where d is the (Nesterov) momentum direction of grad + wd·x."""
        _check_pair(params, grad)
        c = self.config
        lr = self.lr(step)
        d = grad
        if c.weight_decay != 0:
            d = d.add(params, alpha=c.weight_decay)
        if c.momentum != 0:
            if self._buf is None:
                buf = torch.clone(d).detach()
            else:
                if self._buf.shape != d.shape:
                    raise ValueError("momentum buffer shape does not match the parameters")
                buf = self._buf.mul(c.momentum).add_(d, alpha=1 - c.dampening)
            self._buf = buf
            d = d.add(buf, alpha=c.momentum) if c.nesterov else buf
        return params.add(d, alpha=-lr)

    def state_dict(self) -> dict[str, Tensor]:
        """A copy of the state (empty before the first momentum step)."""
        return {} if self._buf is None else {"momentum_buffer": self._buf.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Replace the state by a copy of ``state`` (as produced by `state_dict`)."""
        if not state:
            self._buf = None
            return
        _check_state(state, {"momentum_buffer": tuple(state.get("momentum_buffer", torch.empty(0)).shape)})
        buf = state["momentum_buffer"]
        if buf.dim() != 1:
            raise ValueError("momentum_buffer must be flat")
        self._buf = buf.detach().clone()


class FlatAdam:
    """``torch.optim.Adam`` on one flat tensor; state: ``{"step", "exp_avg", "exp_avg_sq"}``."""

    def __init__(self, config: AdamConfig) -> None:
        self.config = config
        self._count = 0
        self._exp_avg: Tensor | None = None
        self._exp_avg_sq: Tensor | None = None

    def lr(self, step: int) -> float:
        """The learning rate used at ``step``."""
        return self.config.lr * self.config.schedule.factor(step)

    def step(self, params: Tensor, grad: Tensor, step: int) -> Tensor:
        """Return the Adam update of ``params``; bias correction counts the updates applied so far."""
        _check_pair(params, grad)
        c = self.config
        lr = self.lr(step)
        beta1, beta2 = c.betas
        if self._exp_avg is None or self._exp_avg_sq is None:
            exp_avg, exp_avg_sq = torch.zeros_like(params), torch.zeros_like(params)
        else:
            exp_avg, exp_avg_sq = self._exp_avg.clone(), self._exp_avg_sq.clone()
        count = self._count + 1
        g = grad
        if c.weight_decay != 0:
            g = g.add(params, alpha=c.weight_decay)
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias_correction1 = 1 - beta1**count
        bias_correction2 = 1 - beta2**count
        step_size = lr / bias_correction1
        denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(c.eps)
        out = params.addcdiv(exp_avg, denom, value=-step_size)
        self._count, self._exp_avg, self._exp_avg_sq = count, exp_avg, exp_avg_sq
        return out

    def state_dict(self) -> dict[str, Tensor]:
        """A copy of the state (empty before the first step)."""
        if self._exp_avg is None or self._exp_avg_sq is None:
            return {}
        return {
            "step": torch.tensor(self._count, dtype=torch.int64),
            "exp_avg": self._exp_avg.clone(),
            "exp_avg_sq": self._exp_avg_sq.clone(),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Replace the state by a copy of ``state`` (as produced by `state_dict`)."""
        if not state:
            self._count, self._exp_avg, self._exp_avg_sq = 0, None, None
            return
        n = tuple(state.get("exp_avg", torch.empty(0)).shape)
        _check_state(state, {"step": (), "exp_avg": n, "exp_avg_sq": n})
        if len(n) != 1 or int(state["step"]) < 1:
            raise ValueError("Adam state must have flat moments and step >= 1")
        self._count = int(state["step"])
        self._exp_avg = state["exp_avg"].detach().clone()
        self._exp_avg_sq = state["exp_avg_sq"].detach().clone()


def make_optimizer(config: OptimizerConfig) -> FlatOptimizer:
    """A fresh optimizer (empty state) for ``config``."""
    if isinstance(config, SGDConfig):
        return FlatSGD(config)
    if isinstance(config, AdamConfig):
        return FlatAdam(config)
    raise TypeError(f"unknown optimizer config {type(config).__name__}")
