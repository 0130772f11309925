"""Attacks for evaluating BTARD, and the interface for writing your own.

Gradient attacks (this package) decide the vector a Byzantine peer sends as its gradient: `SignFlip`,
`RandomDirection`, `LabelFlip`, `DelayedGradient`, `IPM`, `ALIE`, `GaussianNoise`, `NaNAttack`. Protocol
attacks (misbehaviour inside the protocol) live in the protocol package and register here with
``kind = AttackKind.PROTOCOL``. Build any of them by name: ``get_attack("sign-flip", k=1000)``; decide when
they act with an `AttackSchedule`; runners call ``attack.observe(ctx)`` at every step and `apply_attack` when
the schedule is active.

Writing a custom attack
-----------------------
Subclass `GradientAttack`, implement ``__call__(ctx) -> Tensor`` returning the (d,) vector to send, take all
randomness from ``ctx.shared_generator(tag)`` / ``ctx.peer_generator(tag)``, and never modify the context's
tensors. Then pass ``"my_module:ScaledMean"`` (or ``"path/to/file.py:ScaledMean"``) wherever an attack name is
expected, or register a short name. Example::

    import torch
    from torch import Tensor
    from btard.attacks import AttackContext, GradientAttack, register_attack

    class ScaledMean(GradientAttack):  # v = −k·μ + 0.01·u, u shared by all attackers of the step
        name = "scaled-mean"
        needs_honest_gradients = True  # omniscient: reads ctx.honest_gradients

        def __init__(self, k: float = 10.0) -> None:
            self.k = k

        def __call__(self, ctx: AttackContext) -> Tensor:
            mu = ctx.require_honest_gradients().mean(dim=0)
            u = torch.randn(ctx.d, generator=ctx.shared_generator(self.name), dtype=mu.dtype)
            return -self.k * mu + 0.01 * u

    register_attack("scaled-mean", ScaledMean)  # now get_attack("scaled-mean", k=3) builds it

Stateful attacks must keep their state explicitly, keyed by ``ctx.peer_id`` if one instance serves several
peers, and update it in `GradientAttack.observe`, which the runner calls at every step (see
`DelayedGradient`).
"""

from btard.attacks.base import (
    Attack,
    AttackContext,
    AttackKind,
    AttackSchedule,
    GradientAttack,
    GradientFn,
    apply_attack,
    check_slices,
    flat_slices,
)
from btard.attacks.gradient import (
    ALIE,
    IPM,
    DelayedGradient,
    GaussianNoise,
    LabelFlip,
    NaNAttack,
    RandomDirection,
    SignFlip,
    alie_z,
    flip_labels,
)
from btard.attacks.registry import (
    get_attack,
    list_attacks,
    load_attack_class,
    register_attack,
    resolve_attack,
)

__all__ = [
    "ALIE",
    "IPM",
    "Attack",
    "AttackContext",
    "AttackKind",
    "AttackSchedule",
    "DelayedGradient",
    "GaussianNoise",
    "GradientAttack",
    "GradientFn",
    "LabelFlip",
    "NaNAttack",
    "RandomDirection",
    "SignFlip",
    "alie_z",
    "apply_attack",
    "check_slices",
    "flat_slices",
    "flip_labels",
    "get_attack",
    "list_attacks",
    "load_attack_class",
    "register_attack",
    "resolve_attack",
]
