"""The phases of one BTARD step as data (after h11's `_state.py`): who waits for what, and what follows.

Each row: phase -> (kinds whose messages close it, the phase that follows, timeout multiple). A barrier phase
collects its kinds until every expected message is present or its first deadline passes, then publishes a
DIGEST of what it holds, pulls what others hold and it lacks (two different signed messages in one slot are an
equivocation proof), and closes once every member's digest arrived or its second deadline passes.
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
    Phase.ACCUSE: (Kind.ACCUSE,),
}

# When each phase's barrier starts, in units of the phase timeout T after the step began. A barrier's first
# deadline is start + T, its second start + 2T. Deadlines are absolute (from the step start), so a peer that is
# slow in one phase does not shift its later deadlines, and peers stay in lock-step as a synchronous round
# protocol requires. SCATTER: public re-send requests at 3T, aggregation at the latest at 4T.
PHASE_START: dict[Phase, int] = {
    Phase.COMMIT: 0,
    Phase.SCATTER: 2,
    Phase.AGGREGATE: 4,
    Phase.MPRNG_COMMIT: 6,
    Phase.MPRNG_REVEAL: 8,
    Phase.PROJ: 10,
    Phase.ACCUSE: 12,
}

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
