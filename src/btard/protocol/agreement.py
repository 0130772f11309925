"""Agreement on the set of signed items of one barrier phase: Dolev–Strong for sets, with barrier-driven rounds.

Every barrier phase of a step (COMMIT, AGGREGATE, MPRNG_COMMIT, MPRNG_REVEAL, PROJ, ACCUSE) ends with every honest
peer holding the **same accepted set** of signed items, whatever Byzantine members send, to whom and when. The
step's decisions are then pure functions of these sets (see `decision.py`); the argument is in
`docs/agreement.md`. This module only keeps the books; the peer moves messages.

Rules (R = f + 1 rounds, f the number of Byzantine members tolerated, ⌊(n − 1)/2⌋ by default):

- **Signers.** An item's signers are the members whose round messages (signed DIGESTs) list it, plus its origin
  when the phase counts origin signatures (phases whose items are *expected*: one per member, so round 1 can
  wait for each of them). In the ACCUSE phase items are unexpected (accusations, JOIN, LEAVE, public re-sends),
  so a member's round-1 DIGEST (its manifest) is what brings an item into round 1, and origins do not count.
- **Acceptance.** In round k a peer accepts an item it holds with at least k distinct signers.
- **Relay.** At the end of round k < R a peer broadcasts its round-(k + 1) DIGEST listing the items it newly
  accepted in round k, and forwards the signed round messages of those items' other signers (its support), so
  every receiver sees at least k + 1 signers. Items accepted in round R are not relayed.
- **Round end.** Round 1 ends when every expected item (ACCUSE: every live member's manifest) is held, round
  k ≥ 2 when every live member's round-k DIGEST came; in both cases also every item and support message that
  could still be accepted in this round is held; or at the round's deadline (phase start + k·T). A member that
  missed a deadline is not waited for again in this phase (under synchrony only a faulty member misses one).

Why all honest peers accept the same set (synchrony: an honest message arrives within one round):
if an honest peer accepts x in round k < R it relays x with ≥ k + 1 signers, which every honest peer receives
before its round k + 1 ends, so all accept x by round k + 1; if it accepts x in round R, x has R = f + 1 signers,
one of them honest, who listed x only after accepting it in an earlier round, so again all accept x by round R.
An item that reached only some honest peers late (a Byzantine's timing game) is thus either accepted by all or
by none; it is never left to chance.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

ItemRef = tuple[int, bytes, int]
"""(kind, origin, index) of an item: its slot (ACCUSE-phase items: (kind, sender, 0))."""


def default_rounds(members: int, max_faulty: int | None = None) -> int:
    """R = f + 1 with f = ⌊(n − 1)/2⌋ (an honest majority) unless the run sets a smaller bound."""
    f = (members - 1) // 2 if max_faulty is None else max(0, min(max_faulty, (members - 1) // 2))
    return f + 1


@dataclass
class PhaseAgreement:
    """The books of one phase's agreement at one peer (pure bookkeeping: no I/O, no clocks read)."""

    me: bytes
    members: frozenset[bytes]
    rounds: int
    start: float
    timeout: float
    origin_signs: bool  # origins count as signers (phases of expected items); False for ACCUSE
    round: int = 1
    closed: bool = False
    held: dict[bytes, ItemRef] = field(default_factory=dict)  # item digest -> slot, for items held here
    origin: dict[bytes, bytes] = field(default_factory=dict)  # item digest -> its sender
    listers: dict[bytes, set[bytes]] = field(default_factory=dict)  # item digest -> members listing it
    refs: dict[bytes, ItemRef] = field(default_factory=dict)  # item digest -> slot, for listed items
    # item digest -> {lister: (digest, raw bytes) of the lister's round message}
    support: dict[bytes, dict[bytes, tuple[bytes, bytes]]] = field(default_factory=dict)
    support_wanted: dict[bytes, set[bytes]] = field(default_factory=dict)  # round msg digest -> listers
    round_msgs: set[bytes] = field(default_factory=set)  # digests of the round messages received
    accepted: dict[bytes, int] = field(default_factory=dict)  # item digest -> round it was accepted in
    relayed: set[bytes] = field(default_factory=set)
    heard: dict[int, set[bytes]] = field(default_factory=dict)  # round -> members whose DIGEST came
    timed_out: set[bytes] = field(default_factory=set)  # shared by the phases of one step

    def deadline(self, k: int | None = None) -> float:
        return self.start + (self.round if k is None else k) * self.timeout

    # ------------------------------------------------------------------ inputs
    def hold(self, d: bytes, ref: ItemRef, sender: bytes) -> None:
        """An item (verified, fitting its role) is held here."""
        if self.closed or d in self.held:
            return
        self.held[d] = ref
        self.origin[d] = sender
        self._try_accept(d)

    def on_round_message(
        self, sender: bytes, k: int, msg_digest: bytes, entries: Iterable[tuple], raw: bytes
    ) -> None:
        """A member's signed round-k DIGEST: (kind, origin, index, item digest) entries it accepted."""
        if self.closed or sender not in self.members:
            return
        self.round_msgs.add(msg_digest)
        self.support_wanted.pop(msg_digest, None)
        self.heard.setdefault(k, set()).add(sender)
        for kind, origin, idx, h in entries:
            self.listers.setdefault(h, set()).add(sender)
            self.refs.setdefault(h, (kind, origin, idx))
            self.support.setdefault(h, {}).setdefault(sender, (msg_digest, raw))
            self._try_accept(h)

    def expect_support(self, digests: Iterable[bytes], lister: bytes) -> None:
        """A relay names the round messages it forwards: wait for them in this round (they travel with it)."""
        for d in digests:
            if d not in self.round_msgs:
                self.support_wanted.setdefault(d, set()).add(lister)

    # ------------------------------------------------------------------ state
    def signers(self, d: bytes) -> set[bytes]:
        s = set(self.listers.get(d, ()))
        o = self.origin.get(d)
        if self.origin_signs and o is not None and o in self.members:
            s.add(o)
        elif self.origin_signs and d not in self.held:
            ref = self.refs.get(d)
            if ref is not None and ref[1] in self.members:
                s.add(ref[1])  # the origin's signature travels with the item, pulled or not
        return s

    def _try_accept(self, d: bytes) -> None:
        if d in self.held and d not in self.accepted and len(self.signers(d)) >= self.round:
            self.accepted[d] = self.round

    def wanted(self) -> list[tuple[bytes, ItemRef, list[bytes]]]:
        """Listed items not held that could still be accepted in this round: (digest, slot, listers)."""
        out = []
        for h, who in self.listers.items():
            if h not in self.held and len(self.signers(h)) >= self.round:
                out.append((h, self.refs[h], sorted(who)))
        return out

    def waiting_for(self, live: Iterable[bytes]) -> set[bytes]:
        """Members whose round message of the current round has not come (round ≥ 2; round 1 of a manifest
        phase waits for manifests)."""
        got = self.heard.get(self.round, set())
        return {p for p in live if p != self.me and p not in got and p not in self.timed_out}

    def round_complete(self, live: Iterable[bytes], expected_missing: bool) -> bool:
        if self.round == 1 and self.origin_signs:
            waiting: set[bytes] = set()
        else:
            waiting = self.waiting_for(live)
        if self.round == 1 and expected_missing:
            return False
        return not waiting and not self.wanted() and not self.support_wanted

    def end_round(
        self, live: Iterable[bytes], deadline_passed: bool
    ) -> tuple[list[bytes], list[tuple[bytes, bytes]]] | None:
        """Close the current round. Returns (items to list, (digest, raw) of the support messages to forward)
        for the next round's DIGEST, or None when this was round R (the accepted set is final)."""
        if deadline_passed and (self.round >= 2 or not self.origin_signs):  # rounds that wait for members
            self.timed_out |= self.waiting_for(live)
        k = self.round
        new = sorted(d for d, r in self.accepted.items() if r == k and d not in self.relayed)
        if k >= self.rounds:
            self.closed = True
            return None
        self.relayed.update(new)
        forward: dict[bytes, bytes] = {}
        for d in new:
            for lister, (md, raw) in sorted(self.support.get(d, {}).items()):
                if lister != self.me:
                    forward[md] = raw
        self.round = k + 1  # the threshold rises: from now on an item needs k + 1 signers
        return new, sorted(forward.items())

    def agreed(self) -> set[bytes]:
        """The accepted set (final once `closed`)."""
        return set(self.accepted)
