"""A late second version of one gradient part, shown to a single honest peer (issue 10's reproduction).

At step `start`, when it enters AGGREGATE (about 0.1 s into a healthy step: the parts have been scattered, the
ACCUSE phase is far off), the attacker signs ONE extra GRAD_PART for the current step: the same (sender, part)
slot as a part it already sent to that part's aggregator, with different data. It sends it to ONE peer only: the
first member (in member order) that is neither the attacker nor the aggregator of that part, so an honest
non-aggregator. Everything else it does is honest.

The message proves equivocation only to a peer that holds both versions; whether and when the honest peers learn
of it depends on what they relay, so it tests that a late item cannot split the honest peers' decisions.

Use it by path (``--attack btard.attacks.late_part:LatePart``); it needs no registration.
"""

from __future__ import annotations

import sys

from btard.attacks.protocol import ProtocolAttack
from btard.protocol.messages import GradPart
from btard.protocol.peer import BtardPeer
from btard.protocol.state import Phase

__all__ = ["LatePart"]


class LatePart(ProtocolAttack):
    """At step `start`, send one second-version GRAD_PART (data + `shift`) to one honest non-aggregator."""

    name = "late-part"

    def __init__(self, start: int = 1, phase: str | int = "AGGREGATE", shift: float = 1.0) -> None:
        super().__init__(start)
        self.phase = Phase[phase] if isinstance(phase, str) else Phase(phase)
        self.shift = shift
        self.sent = False

    def extra_messages(self, peer: BtardPeer, phase: Phase):
        if self.sent or phase != self.phase or peer.step != self.start or peer.gradient is None:
            return []
        if peer.id not in peer.committed:
            return []
        j = next((j for j, a in sorted(peer.aggregators.items()) if a != peer.id), None)
        if j is None:
            return []
        target = next((p for p in peer.members if p not in (peer.id, peer.aggregators[j])), None)
        if target is None:
            return []
        a, b = peer.bounds[j]
        fake = GradPart.of(peer.cfg.run_id, peer.step, peer.id, j, peer.gradient[a:b] + self.shift)
        self.sent = True
        # One line for the test (the launcher keeps each peer's stderr): what was sent, to whom.
        print(
            f"late-part: step {peer.step} part {j} aggregator {peer.aggregators[j].hex()} "
            f"target {target.hex()}",
            file=sys.stderr,
            flush=True,
        )
        return [(fake, (target,))]
