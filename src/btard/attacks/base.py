"""The plug-in interface for attacks: what a Byzantine peer sees (`AttackContext`), what it implements
(`GradientAttack`), and when it attacks (`AttackSchedule`).

An attack is a small object configured once and then called once per step and Byzantine peer. It receives an
immutable `AttackContext` and returns the flat vector that peer sends in place of its true gradient. It must
never modify the tensors of the context in place. Randomness comes only from the context's generators, which
are derived from the run seed and the step, so a run is reproducible and every attacker of a step can draw
the same "shared" random numbers without talking to the others.
"""

from __future__ import annotations

import abc
import enum
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch
from torch import Tensor

__all__ = [
    "Attack",
    "AttackContext",
    "AttackKind",
    "AttackSchedule",
    "GradientAttack",
    "GradientFn",
    "apply_attack",
    "check_slices",
    "flat_slices",
]

# Domain-separation tag of the attack RNG, so its streams never coincide with any other use of the run seed.
_RNG_DOMAIN = b"btard/attack-rng/v1"


class AttackKind(enum.StrEnum):
    """Where an attack acts.

    ``GRADIENT``: it only changes the vector a Byzantine peer sends as its gradient (this package).
    ``PROTOCOL``: it misbehaves inside the protocol (wrong aggregate, equivocation, ...); those attacks live
    with the protocol and subclass `Attack` with ``kind = AttackKind.PROTOCOL``.
    """

    GRADIENT = "gradient"
    PROTOCOL = "protocol"


class GradientFn(Protocol):
    """Recomputes this peer's gradient of the step on its own (public-seed) minibatch.

    With ``label_flip=True`` the task computes it on flipped labels y → (C − 1) − y instead.
    """

    def __call__(self, *, label_flip: bool = False) -> Tensor: ...


def _derive_seed(*parts: bytes | str | int) -> int:
    """A 63-bit seed from BLAKE2b over length-prefixed, type-tagged parts (no two inputs collide)."""
    h = hashlib.blake2b(digest_size=8, person=b"btard-attack")
    h.update(_RNG_DOMAIN)
    for part in parts:
        if isinstance(part, bool):
            raise TypeError("seed parts must be bytes, str or int, not bool")
        if isinstance(part, bytes):
            tag, raw = b"b", part
        elif isinstance(part, str):
            tag, raw = b"s", part.encode()
        elif isinstance(part, int):
            tag, raw = b"i", str(part).encode()
        else:
            raise TypeError(f"seed parts must be bytes, str or int, got {type(part).__name__}")
        h.update(tag + len(raw).to_bytes(8, "little") + raw)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def flat_slices(tensors: Iterable[Tensor]) -> tuple[tuple[int, int], ...]:
    """The (start, end) slice of each tensor in the flat concatenation of ``tensors`` (e.g. a model's
    ``parameters()``), in order. Pass it as `AttackContext.param_slices` to let attacks work per tensor."""
    out: list[tuple[int, int]] = []
    start = 0
    for t in tensors:
        end = start + t.numel()
        out.append((start, end))
        start = end
    return tuple(out)


def check_slices(slices: Sequence[tuple[int, int]], d: int) -> tuple[tuple[int, int], ...]:
    """Validate that ``slices`` tile [0, d) in order (each starts where the previous ended; empty ones
    allowed) and return them as a tuple of int pairs. Raises ValueError otherwise."""
    out: list[tuple[int, int]] = []
    pos = 0
    for item in slices:
        if len(item) != 2:
            raise ValueError(f"a slice must be a (start, end) pair, got {item!r}")
        start, end = int(item[0]), int(item[1])
        if start != pos or end < start:
            raise ValueError(f"slices must tile [0, {d}) in order; got ({start}, {end}) after position {pos}")
        out.append((start, end))
        pos = end
    if pos != d:
        raise ValueError(f"slices cover [0, {pos}) but the vector has {d} elements")
    return tuple(out)


@dataclass(frozen=True, eq=False)
class AttackContext:
    """Everything a Byzantine peer knows when it forges its gradient for one step. Immutable; its tensors must
    not be modified by attacks.

    Attributes:
        step: training step t (≥ 0).
        peer_index: index of this peer among the Byzantine peers, 0 ≤ peer_index < b.
        peer_id: this peer's identity (public key bytes).
        byzantine_ids: identities of all b colluding Byzantine peers, in peer_index order (so
            ``byzantine_ids[peer_index] == peer_id``); empty when the runner does not know them.
        own_gradient: (d,) this peer's true gradient of the step.
        n: number of active peers of the step.
        b: number of Byzantine peers.
        seed: run seed of the attackers (int or bytes); all attack randomness derives from it and the step.
        honest_gradients: (h, d) every honest gradient of the step, for omniscient attackers (simulator), or
            None where the attacker only has its own (real swarm). Attacks with
            ``needs_honest_gradients = True`` cannot run without it.
        compute_gradient: recomputes the own gradient, optionally on flipped labels (see `GradientFn`); None
            where the runner cannot do it.
        param_slices: (start, end) of each parameter tensor in the flat vector (see `flat_slices`), for
            attacks that act per tensor; None if unknown (then they act on the whole vector).
    """

    step: int
    peer_index: int
    peer_id: bytes
    byzantine_ids: tuple[bytes, ...]
    own_gradient: Tensor
    n: int
    b: int
    seed: int | bytes = 0
    honest_gradients: Tensor | None = None
    compute_gradient: GradientFn | None = field(default=None, repr=False)
    param_slices: tuple[tuple[int, int], ...] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.step < 0:
            raise ValueError(f"step must be ≥ 0, got {self.step}")
        if not 0 < self.b <= self.n:
            raise ValueError(f"need 0 < b ≤ n, got n={self.n}, b={self.b}")
        if not 0 <= self.peer_index < self.b:
            raise ValueError(f"peer_index must be in [0, b={self.b}), got {self.peer_index}")
        if not isinstance(self.peer_id, bytes):
            raise TypeError("peer_id must be bytes")
        ids = tuple(self.byzantine_ids)
        object.__setattr__(self, "byzantine_ids", ids)
        if ids and (len(ids) != self.b or ids[self.peer_index] != self.peer_id):
            raise ValueError("byzantine_ids must list the b Byzantine peers with peer_id at peer_index")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | bytes):
            raise TypeError("seed must be int or bytes")
        if not isinstance(self.own_gradient, Tensor) or self.own_gradient.dim() != 1:
            raise ValueError("own_gradient must be a 1-D tensor")
        d = self.own_gradient.shape[0]
        hg = self.honest_gradients
        if hg is not None and (not isinstance(hg, Tensor) or hg.dim() != 2 or hg.shape[1] != d):
            raise ValueError(f"honest_gradients must be an (h, {d}) tensor")
        if hg is not None and hg.shape[0] == 0:
            raise ValueError("honest_gradients must hold at least one gradient")
        if self.param_slices is not None:
            object.__setattr__(self, "param_slices", check_slices(self.param_slices, d))

    @property
    def d(self) -> int:
        """Length of the flat gradient."""
        return self.own_gradient.shape[0]

    def require_honest_gradients(self) -> Tensor:
        """The (h, d) honest gradients, or a clear error where this runner does not provide them."""
        if self.honest_gradients is None:
            raise RuntimeError(
                "this attack needs the honest gradients of the step (an omniscient attacker); "
                "the runner provided only the attacker's own gradient"
            )
        return self.honest_gradients

    def shared_generator(self, tag: str) -> torch.Generator:
        """A CPU generator seeded from (run seed, step, tag): identical for every Byzantine peer of the step,
        different across steps, tags and runs. Use it for randomness the attackers coordinate on."""
        return torch.Generator().manual_seed(_derive_seed(self.seed, "shared", self.step, tag))

    def peer_generator(self, tag: str) -> torch.Generator:
        """A CPU generator seeded from (run seed, step, tag, peer_index): independent for each attacker."""
        return torch.Generator().manual_seed(_derive_seed(self.seed, "peer", self.step, tag, self.peer_index))


class Attack(abc.ABC):  # noqa: B024 - the root is abstract by intent even without abstract methods
    """Root of every attack the registry accepts. Gradient attacks subclass `GradientAttack`; protocol attacks
    subclass this class (through the protocol package's own base) with ``kind = AttackKind.PROTOCOL``.

    Class attributes:
        name: registry name (lower-case words joined by hyphens); defaults to the class's qualified name.
        kind: `AttackKind` of the attack.
    """

    name: ClassVar[str]
    kind: ClassVar[AttackKind]

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = cls.__qualname__


class GradientAttack(Attack):
    """Base of gradient attacks: ``attack(ctx)`` returns the (d,) vector this Byzantine peer sends.

    Subclasses implement `__call__` and may set:
        needs_honest_gradients: True if the attack reads ``ctx.honest_gradients`` (omniscient attacks:
            IPM, ALIE); runners that cannot provide them must refuse it (see `apply_attack`).
        label_flip: True if the attack changes the data rather than the vector (label flipping); it then calls
            ``ctx.compute_gradient(label_flip=True)``.

    Contract: same configuration + same context → same vector (randomness only through the context's
    generators); inputs are never modified in place. An attack that must remember past steps (only the
    delayed-gradient attack here) keeps that history explicitly and receives every step through `observe`.
    """

    kind: ClassVar[AttackKind] = AttackKind.GRADIENT
    needs_honest_gradients: ClassVar[bool] = False
    label_flip: ClassVar[bool] = False

    @abc.abstractmethod
    def __call__(self, ctx: AttackContext) -> Tensor:
        """The (d,) vector that Byzantine peer ``ctx.peer_index`` sends at ``ctx.step``."""

    def observe(self, ctx: AttackContext) -> None:  # noqa: B027 - optional hook, no-op for stateless attacks
        """Called by the runner at every step for every Byzantine peer, whether or not the schedule makes the
        attack active at that step, before any `__call__` of that step. Stateless attacks ignore it."""


def apply_attack(attack: GradientAttack, ctx: AttackContext) -> Tensor:
    """Run ``attack`` on ``ctx`` the way runners should: refuse an omniscient attack without honest gradients,
    and check that the result is a (d,) tensor (non-finite values are allowed: they are an attack too).
    Returns the result detached, in the dtype and on the device of the own gradient."""
    if attack.needs_honest_gradients:
        ctx.require_honest_gradients()
    out = attack(ctx)
    if not isinstance(out, Tensor) or out.shape != ctx.own_gradient.shape:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"attack {attack.name!r} returned {shape}, expected a tensor of shape ({ctx.d},)")
    return out.detach().to(dtype=ctx.own_gradient.dtype, device=ctx.own_gradient.device)


@dataclass(frozen=True)
class AttackSchedule:
    """When the Byzantine peers attack. Outside the schedule they behave honestly.

    Active at step t for Byzantine peer p iff start ≤ t, (t − start) mod every = 0, t < stop (if stop is set),
    and p ∈ peers (if peers is set).

    Attributes:
        start: first attack step (BTARD paper: 1000).
        every: attack every k-th step from ``start`` (1 = every step; the paper also uses 10).
        stop: first step without attack (exclusive bound); None = never stops.
        peers: indices among the Byzantine peers that attack; None = all of them.
    """

    start: int = 0
    every: int = 1
    stop: int | None = None
    peers: frozenset[int] | None = None

    def __post_init__(self) -> None:
        if self.start < 0:
            raise ValueError(f"start must be ≥ 0, got {self.start}")
        if self.every < 1:
            raise ValueError(f"every must be ≥ 1, got {self.every}")
        if self.stop is not None and self.stop < self.start:
            raise ValueError(f"stop ({self.stop}) must be ≥ start ({self.start})")
        if self.peers is not None:
            peers = frozenset(int(p) for p in self.peers)
            if any(p < 0 for p in peers):
                raise ValueError("peer indices must be ≥ 0")
            object.__setattr__(self, "peers", peers)

    def active(self, step: int, peer_index: int) -> bool:
        """Whether Byzantine peer ``peer_index`` attacks at ``step``."""
        if step < self.start or (self.stop is not None and step >= self.stop):
            return False
        if (step - self.start) % self.every != 0:
            return False
        return self.peers is None or peer_index in self.peers
