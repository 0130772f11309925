"""Gradient attacks of the literature (spec: attacks.md). Notation: g the attacker's own true gradient, g_i
the honest gradients of the step, μ their mean, σ their coordinate-wise standard deviation, n peers, b of them
Byzantine.

Every attack is configured once and called with an `AttackContext`; it returns a new (d,) tensor in the dtype
and on the device of the own gradient and never modifies its inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from statistics import NormalDist
from typing import ClassVar, Literal

import torch
from torch import Tensor

from btard.attacks.base import AttackContext, GradientAttack, check_slices

__all__ = [
    "ALIE",
    "IPM",
    "DelayedGradient",
    "GaussianNoise",
    "LabelFlip",
    "NaNAttack",
    "RandomDirection",
    "SignFlip",
    "alie_z",
    "flip_labels",
]


def _finite(value: float, what: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}")
    return value


@dataclass(frozen=True)
class SignFlip(GradientAttack):
    """Send the own gradient flipped and scaled: v = −k · g.

    Args:
        k: scale (BTARD paper: 1000; elsewhere 1 or 100).

    Example: ``SignFlip(k=2)(ctx)`` with own gradient [1, −3] gives [−2, 6].
    """

    name: ClassVar[str] = "sign-flip"
    k: float = 1000.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", _finite(self.k, "k"))

    def __call__(self, ctx: AttackContext) -> Tensor:
        return ctx.own_gradient * (-self.k)


@dataclass(frozen=True)
class RandomDirection(GradientAttack):
    """Send one random direction, the same for every attacker of the step, scaled per tensor:
    v[s] = u[s] / ‖u[s]‖ · k · ‖g[s]‖ for each parameter slice s, with u ~ N(0, I_d).

    u is drawn from ``ctx.shared_generator`` (seeded by run seed and step), so all Byzantine peers of a step
    send the same direction (their norms differ with their own gradients) and it changes every step.

    Args:
        k: norm multiplier (BTARD paper: 1000).
        slices: (start, end) slices tiling the flat vector, one per parameter tensor; None → use
            ``ctx.param_slices``, and if that is None too, scale the whole vector at once.
        seed: replaces the run seed ``ctx.seed`` for drawing u (still mixed with the step); None → run seed.
    """

    name: ClassVar[str] = "random-direction"
    k: float = 1000.0
    slices: tuple[tuple[int, int], ...] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", _finite(self.k, "k"))
        if self.slices is not None:
            object.__setattr__(self, "slices", tuple((int(s), int(e)) for s, e in self.slices))

    def __call__(self, ctx: AttackContext) -> Tensor:
        g = ctx.own_gradient
        if self.slices is not None:
            slices = check_slices(self.slices, ctx.d)
        else:
            slices = ctx.param_slices if ctx.param_slices is not None else ((0, ctx.d),)
        gen_ctx = ctx if self.seed is None else replace(ctx, seed=self.seed)
        u = torch.randn(ctx.d, generator=gen_ctx.shared_generator(self.name), dtype=torch.float64)
        g64 = g.detach().to(device="cpu", dtype=torch.float64)
        out = torch.empty_like(u)
        for start, end in slices:
            if end == start:
                continue
            us = u[start:end]
            out[start:end] = us * (
                self.k * torch.linalg.vector_norm(g64[start:end]) / torch.linalg.vector_norm(us)
            )
        return out.to(dtype=g.dtype, device=g.device)


def flip_labels(labels: Tensor, num_classes: int) -> Tensor:
    """Label flipping for `LabelFlip`: y → (C − 1) − y for integer labels in [0, C); returns a new tensor."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be ≥ 1, got {num_classes}")
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError("labels must be an integer tensor")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    return (num_classes - 1) - labels


@dataclass(frozen=True)
class LabelFlip(GradientAttack):
    """Compute the gradient honestly on flipped labels y → (C − 1) − y (C classes), and send it:
    v = ∇f(x; ξ with flipped labels) = ``ctx.compute_gradient(label_flip=True)``.

    The flip itself is done by the training task (see `flip_labels`); runners must supply
    ``ctx.compute_gradient``.
    """

    name: ClassVar[str] = "label-flip"
    label_flip: ClassVar[bool] = True

    def __call__(self, ctx: AttackContext) -> Tensor:
        if ctx.compute_gradient is None:
            raise RuntimeError(
                "label-flip needs ctx.compute_gradient; this runner cannot recompute gradients"
            )
        out = ctx.compute_gradient(label_flip=True)
        if not isinstance(out, Tensor) or out.shape != ctx.own_gradient.shape:
            raise ValueError(f"compute_gradient returned a result of the wrong shape, expected ({ctx.d},)")
        return out.detach().to(dtype=ctx.own_gradient.dtype, device=ctx.own_gradient.device)


@dataclass(eq=False)
class DelayedGradient(GradientAttack):
    """Resend an old own gradient: at an attack step t, v = g^{(t − D)}, the peer's own true gradient of
    step t − D, for the first L attack steps; honest (v = g^{(t)}) afterwards and whenever g^{(t − D)} was not
    recorded.

    **Stateful, explicitly.** The attack keeps, per Byzantine peer (keyed by ``ctx.peer_id``), the own
    gradients of the last D + 1 steps (a copy on the CPU: memory D · d values per peer) and how many stale
    vectors it has sent. The runner must call `observe` at every step for every Byzantine peer, also before
    the attack starts, or there is nothing to resend; `__call__` records the current step too. One instance
    may serve all Byzantine peers. Only stale sends count towards L. `reset` forgets everything.

    Args:
        delay: D ≥ 1, steps back (BTARD paper: 1000).
        length: L ≥ 1, number of attack steps that send a stale vector (BTARD paper: 500); None = no limit.
    """

    name: ClassVar[str] = "delayed-gradient"
    delay: int = 1000
    length: int | None = 500
    _history: dict[bytes, dict[int, Tensor]] = field(default_factory=dict, init=False, repr=False)
    _sent: dict[bytes, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.delay < 1:
            raise ValueError(f"delay must be ≥ 1, got {self.delay}")
        if self.length is not None and self.length < 1:
            raise ValueError(f"length must be ≥ 1 or None, got {self.length}")

    def observe(self, ctx: AttackContext) -> None:
        """Record the own gradient of ``ctx.step`` and drop entries older than ``step − delay``."""
        history = self._history.setdefault(ctx.peer_id, {})
        if ctx.step not in history:
            history[ctx.step] = ctx.own_gradient.detach().to(device="cpu", copy=True)
        for old in [s for s in history if s < ctx.step - self.delay]:
            del history[old]

    def sent(self, peer_id: bytes) -> int:
        """How many stale vectors peer ``peer_id`` has sent so far."""
        return self._sent.get(peer_id, 0)

    def reset(self) -> None:
        """Forget all recorded gradients and counters."""
        self._history.clear()
        self._sent.clear()

    def __call__(self, ctx: AttackContext) -> Tensor:
        self.observe(ctx)
        g = ctx.own_gradient
        old = self._history[ctx.peer_id].get(ctx.step - self.delay)
        sent = self._sent.get(ctx.peer_id, 0)
        if old is None or old.shape != g.shape or (self.length is not None and sent >= self.length):
            return g.detach().clone()
        self._sent[ctx.peer_id] = sent + 1
        return old.to(dtype=g.dtype, device=g.device, copy=True)


@dataclass(frozen=True)
class IPM(GradientAttack):
    """Inner product manipulation (Xie et al., 2020): v = −ε · μ, μ = (1/h) Σ_i g_i over the honest gradients.

    Args:
        eps: ε > 0 (0.1 "small", 100 "large").
    """

    name: ClassVar[str] = "ipm"
    needs_honest_gradients: ClassVar[bool] = True
    eps: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", _finite(self.eps, "eps"))

    def __call__(self, ctx: AttackContext) -> Tensor:
        mu = ctx.require_honest_gradients().to(torch.float64).mean(dim=0)
        return (mu * (-self.eps)).to(dtype=ctx.own_gradient.dtype, device=ctx.own_gradient.device)


ALIEVariant = Literal["standard", "honest"]


def alie_z(n: int, b: int, variant: ALIEVariant = "standard", *, clamp: bool = False) -> float:
    """The z of "A little is enough" (Baruch et al., 2019) from n peers of which b Byzantine.

    s = ⌊n/2 + 1⌋ − b (honest peers the attackers must win over), then
        standard: z = Φ⁻¹((n − s) / n)             (the paper; n=16, b=7 → z ≈ 1.150)
        honest:   z = Φ⁻¹((n − b − s) / (n − b))    (over the honest peers only, as in Karimireddy et al.'s
                                                     code; n=16, b=7 → z ≈ 0.765)
    The probability p = (m − s)/m (m = n or n − b) is outside (0, 1) when s ≤ 0 (the attackers are already a
    majority: no honest peer needs winning over, p ≥ 1, z = +∞) or s ≥ m (p ≤ 0, z = −∞), and undefined
    without attackers or honest peers. With clamp=False (the formula as published) these raise ValueError.
    With clamp=True (what `ALIE` uses, since a step's contributor count is whatever the step has) p is
    clamped into [1/(2m), 1 − 1/(2m)] — the quantiles at which half a peer's worth of the m values lies
    beyond μ − zσ, the most extreme z the formula gives a meaning to at this m — with m ≥ 1 taken as n − b
    clamped to at least 1 for the honest variant; n = 16, b = 9 then gives z = Φ⁻¹(31/32) ≈ 1.86. Any n ≥ 1,
    b ≥ 0 then gives a finite z.
    """
    if variant not in ("standard", "honest"):
        raise ValueError(f"unknown ALIE variant {variant!r}; expected 'standard' or 'honest'")
    if clamp:
        if (
            isinstance(n, bool)
            or not isinstance(n, int)
            or n < 1
            or isinstance(b, bool)
            or not isinstance(b, int)
        ):
            raise ValueError(f"need integers n >= 1 and b, got n={n!r}, b={b!r}")
        b = min(max(b, 0), n)
    elif not 0 < b < n:
        raise ValueError(f"need 0 < b < n, got n={n}, b={b}")
    s = math.floor(n / 2 + 1) - b
    m = n if variant == "standard" else max(n - b, 1)
    p = (m - s) / m
    if clamp:
        p = min(max(p, 1 / (2 * m)), 1 - 1 / (2 * m)) if m > 1 else 0.5
    if not 0 < p < 1:
        raise ValueError(f"ALIE z undefined for n={n}, b={b} ({variant}: p={p}); pass z explicitly")
    return NormalDist().inv_cdf(p)


@dataclass(frozen=True)
class ALIE(GradientAttack):
    """A little is enough (Baruch et al., 2019): every attacker sends the same v = μ − z · σ, with μ the mean
    and σ the coordinate-wise standard deviation of the honest gradients.

    Args:
        z: fixed z; None → `alie_z(ctx.n, ctx.b, variant, clamp=True)` at each call: the formula's z, clamped
            to a finite value when the step's counts leave it undefined (e.g. a Byzantine majority among the
            step's contributors), so the attack never raises on a step's configuration.
        variant: "standard" or "honest" (see `alie_z`).
        unbiased: σ with Bessel's correction (divide by h − 1, needs h ≥ 2) if True; population std (divide by
            h, as ByzFL) if False (default).
    """

    name: ClassVar[str] = "alie"
    needs_honest_gradients: ClassVar[bool] = True
    z: float | None = None
    variant: ALIEVariant = "standard"
    unbiased: bool = False

    def __post_init__(self) -> None:
        if self.variant not in ("standard", "honest"):
            raise ValueError(f"unknown ALIE variant {self.variant!r}; expected 'standard' or 'honest'")
        if self.z is not None:
            object.__setattr__(self, "z", _finite(self.z, "z"))

    def z_for(self, n: int, b: int) -> float:
        """The z used with n peers of which b Byzantine."""
        return self.z if self.z is not None else alie_z(n, b, self.variant, clamp=True)

    def __call__(self, ctx: AttackContext) -> Tensor:
        hg = ctx.require_honest_gradients().to(torch.float64)
        if self.unbiased and hg.shape[0] < 2:
            raise ValueError("the unbiased standard deviation needs at least 2 honest gradients")
        mu = hg.mean(dim=0)
        sigma = hg.std(dim=0, correction=1 if self.unbiased else 0)
        v = mu - self.z_for(ctx.n, ctx.b) * sigma
        return v.to(dtype=ctx.own_gradient.dtype, device=ctx.own_gradient.device)


@dataclass(frozen=True)
class GaussianNoise(GradientAttack):
    """Send pure noise: v ~ N(0, σ_a² I_d), drawn independently by each attacker from ``ctx.peer_generator``
    (deterministic in run seed, step and peer index).

    Args:
        sigma: σ_a ≥ 0 (literature: 1 or 100).
    """

    name: ClassVar[str] = "gaussian"
    sigma: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma", _finite(self.sigma, "sigma"))
        if self.sigma < 0:
            raise ValueError(f"sigma must be ≥ 0, got {self.sigma}")

    def __call__(self, ctx: AttackContext) -> Tensor:
        v = torch.randn(ctx.d, generator=ctx.peer_generator(self.name), dtype=torch.float64) * self.sigma
        return v.to(dtype=ctx.own_gradient.dtype, device=ctx.own_gradient.device)


_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


@dataclass(frozen=True)
class NaNAttack(GradientAttack):
    """Send non-finite values: v = g with m = max(1, round(fraction · d)) coordinates, chosen at random by
    each attacker (``ctx.peer_generator``), replaced by NaN, +Inf or −Inf. Honest peers must reject it as
    provable misbehaviour.

    Args:
        value: "nan", "inf" or "-inf".
        fraction: share of poisoned coordinates in (0, 1]; 1 → the whole vector.
    """

    name: ClassVar[str] = "nan"
    value: Literal["nan", "inf", "-inf"] = "nan"
    fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.value not in _NON_FINITE:
            raise ValueError(f"value must be one of {sorted(_NON_FINITE)}, got {self.value!r}")
        if not 0 < float(self.fraction) <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")

    def __call__(self, ctx: AttackContext) -> Tensor:
        g = ctx.own_gradient
        if not g.is_floating_point():
            raise TypeError("non-finite values need a floating-point gradient")
        out = g.detach().clone()
        if ctx.d == 0:
            return out
        m = max(1, round(float(self.fraction) * ctx.d))
        if m >= ctx.d:
            return out.fill_(_NON_FINITE[self.value])
        idx = torch.randperm(ctx.d, generator=ctx.peer_generator(self.name))[:m].to(g.device)
        out[idx] = _NON_FINITE[self.value]
        return out
