"""The phases of one BTARD step as data (after h11's `_state.py`): who waits for what, and what follows.

Each barrier phase collects its kinds until every expected message is present or its first deadline passes, then
runs the rounds of its agreement (`agreement.py`): DIGESTs of what each peer accepted, pulls of what others hold
and it lacks (two different signed messages in one slot are an equivocation proof), until round R closes with
the same accepted set at every honest peer. `NEXT_PHASE` says what follows each phase.
"""

from __future__ import annotations

import enum

from btard.protocol.messages import Kind


class Phase(enum.IntEnum):
    IDLE = 0
    COMMIT = 1  # GRAD_COMMIT from every contributor
    SCATTER = 2  # aggregators collect GRAD_PART (others pass through)
    AGGREGATE = 3  # AGG_COMMIT + AGG_PART for every part
    MPRNG_COMMIT = 4
    MPRNG_REVEAL = 5
    PROJ = 6  # PROJ from every contributor
    ACCUSE = 7  # digest exchange of accusations, then verdicts
    DONE = 8


BARRIER_KINDS: dict[Phase, tuple[Kind, ...]] = {
    Phase.COMMIT: (Kind.GRAD_COMMIT,),
    Phase.AGGREGATE: (Kind.AGG_COMMIT, Kind.AGG_PART),
    Phase.MPRNG_COMMIT: (Kind.MPRNG_COMMIT,),
    Phase.MPRNG_REVEAL: (Kind.MPRNG_REVEAL,),
    Phase.PROJ: (Kind.PROJ,),
    Phase.ACCUSE: (Kind.ACCUSE, Kind.JOIN, Kind.LEAVE, Kind.PULL, Kind.GRAD_PART),  # the step's public items
}

# The barrier phase whose agreement covers each broadcast kind (public items: see BARRIER_KINDS[ACCUSE]).
KIND_PHASE: dict[Kind, Phase] = {
    Kind.GRAD_COMMIT: Phase.COMMIT,
    Kind.AGG_COMMIT: Phase.AGGREGATE,
    Kind.AGG_PART: Phase.AGGREGATE,
    Kind.MPRNG_COMMIT: Phase.MPRNG_COMMIT,
    Kind.MPRNG_REVEAL: Phase.MPRNG_REVEAL,
    Kind.PROJ: Phase.PROJ,
}

# Each barrier phase runs the R rounds of its agreement (see `agreement.py`), round k ending at the latest at
# phase start + k·T; SCATTER has two deadlines (public re-send requests at +T, aggregation at the latest at +2T).
# Deadlines are absolute (from the step start), so a peer that is slow in one phase does not shift its later
# deadlines, and peers stay in lock-step as a synchronous round protocol requires.
SCATTER_LENGTH = 2
PHASE_ORDER: tuple[Phase, ...] = (
    Phase.COMMIT,
    Phase.SCATTER,
    Phase.AGGREGATE,
    Phase.MPRNG_COMMIT,
    Phase.MPRNG_REVEAL,
    Phase.PROJ,
    Phase.ACCUSE,
)


def phase_start(phase: Phase, rounds: int) -> int:
    """When `phase` starts, in units of the phase timeout T after the step began, with R = `rounds`."""
    off = 0
    for p in PHASE_ORDER:
        if p == phase:
            return off
        off += SCATTER_LENGTH if p == Phase.SCATTER else rounds
    raise ValueError(f"{phase!r} has no start")


NEXT_PHASE: dict[Phase, Phase] = {
    Phase.IDLE: Phase.COMMIT,
    Phase.COMMIT: Phase.SCATTER,
    Phase.SCATTER: Phase.AGGREGATE,
    Phase.AGGREGATE: Phase.MPRNG_COMMIT,
    Phase.MPRNG_COMMIT: Phase.MPRNG_REVEAL,
    Phase.MPRNG_REVEAL: Phase.PROJ,
    Phase.PROJ: Phase.ACCUSE,
    Phase.ACCUSE: Phase.DONE,
    Phase.DONE: Phase.IDLE,
}

# Message kinds that fill a slot of the step: two different signed messages in one slot prove equivocation.
CONTENT_KINDS = frozenset(
    {
        Kind.GRAD_COMMIT,
        Kind.GRAD_PART,
        Kind.AGG_COMMIT,
        Kind.AGG_PART,
        Kind.MPRNG_COMMIT,
        Kind.MPRNG_REVEAL,
        Kind.PROJ,
    }
)
