"""What the protocol state machine gives out (after h11's `_events.py`): small immutable values.

`BtardPeer.events()` returns `Event`s in order: `PhaseEntered` when a phase starts (before its messages), `Send`
for bytes to deliver, and one `StepResult` when a step's decisions are final.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from btard.crypto import short_id
from btard.protocol.messages import Reason
from btard.protocol.state import Phase


@dataclass(frozen=True)
class Send:
    """Deliver `raw` to each peer in `dests`."""

    dests: tuple[bytes, ...]
    raw: bytes


@dataclass(frozen=True)
class PhaseEntered:
    """The peer entered `phase` of `step`. Emitted in order with the `Send` events, before the messages of
    that phase, so a driver can observe (or, for fault injection, crash at) every phase even when several
    are passed in one call."""

    step: int
    phase: Phase


class BanReason(enum.Enum):
    """Why a peer is banned (`Verdict.code`); the first seven are the accusation reasons proven true."""

    COMMIT_MISMATCH = "commit-mismatch"
    EQUIVOCATION = "equivocation"
    NONFINITE = "nonfinite"
    WRONG_PROJECTION = "wrong-projection"
    VALIDATION = "validation"
    MPRNG_MISMATCH = "mprng-mismatch"
    BAD_SHAPE = "bad-shape"
    FALSE_ACCUSATION = "false-accusation"  # its accusation's evidence did not prove the accused's fault
    WRONG_INPUTS = (
        "wrong-inputs"  # as aggregator, declared inputs it was not allowed or omitted required ones
    )
    FAILED_CHECK = "failed-check"  # as aggregator, its part failed the projection (fixed-point) check

    @classmethod
    def of(cls, r: Reason) -> BanReason:
        return cls(r.name.lower().replace("_", "-"))


@dataclass(frozen=True)
class Verdict:
    """A ban decided from public evidence; identical at every honest peer. `code` says why in a form programs
    match on; `reason` is the same for people (with the detail: which part, whom a false accusation named)."""

    step: int
    banned: bytes
    code: BanReason
    reason: str
    accuser: bytes | None
    evidence: tuple[bytes, ...] = ()  # digests of the signed messages that justify it

    def describe(self) -> str:
        by = f" (accused by {short_id(self.accuser)})" if self.accuser else ""
        return f"step {self.step}: banned {short_id(self.banned)}: {self.reason}{by}"


@dataclass(frozen=True)
class StepResult:
    step: int
    aggregate: torch.Tensor
    r: bytes
    verdicts: tuple[Verdict, ...]
    excluded: tuple[bytes, ...]
    members: tuple[bytes, ...]
    next_members: tuple[bytes, ...]
    next_validators: dict[bytes, bytes]
    failed_parts: tuple[int, ...]
    missing_parts: tuple[int, ...]
    unapplied_parts: tuple[int, ...]  # passed the fixed-point check but failed the scale check: not applied
    clip_iterations: int
    clipped: int
    rejected_messages: int
    joined: tuple[bytes, ...] = ()  # admitted this step: members of the next step, observers in it
    left: tuple[bytes, ...] = ()  # left gracefully after this step (a LEAVE covered by the ACCUSE digest)
    next_phase_timeout: float = 0.0  # T of the next step, derived from the members' reported phase times
    probation: dict[bytes, int] = field(default_factory=dict)  # peer -> last step of its probation
    partitioned: bool = False  # this peer kept at most half of the members: it is the one cut off, stop
    agreed: tuple[bytes, ...] = ()  # digests of the step's agreed items (sorted): what the decisions used


Event = Send | PhaseEntered | StepResult
