"""Protocol attacks: Byzantine behaviour inside the BTARD protocol (attacks.md, second table).

Each attack is a `btard.protocol.peer.Behaviour` subclass: it overrides the hooks where it departs from the
honest protocol. Colluding attackers share a `Coalition` (omniscient attackers in one process).
Write your own the same way and pass it by path (``--attack mymodule:MyBehaviour``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from btard.attacks.base import Attack, AttackKind
from btard.protocol import checks
from btard.protocol.messages import Accuse, GradCommit, GradPart, Kind, Limits, MprngReveal, Reason, Signed
from btard.protocol.peer import Behaviour, BtardPeer
from btard.protocol.state import Phase


class ProtocolAttack(Behaviour, Attack):
    """Base of protocol attacks. `start`: first step at which the attack is active."""

    kind = AttackKind.PROTOCOL

    def __init__(self, start: int = 0) -> None:
        self.start = start

    def on(self, peer: BtardPeer) -> bool:
        return peer.step >= self.start


class WrongAggregate(ProtocolAttack):
    """As aggregator, publish ĝ[j] + e with ‖e‖ = scale·(‖ĝ[j]‖ + 1e-3) (consistent commit and part)."""

    name = "wrong-aggregate"

    def __init__(self, scale: float = 1.0, start: int = 0) -> None:
        super().__init__(start)
        self.scale = scale

    def agg_commit_value(self, peer: BtardPeer, j: int, agg: torch.Tensor) -> torch.Tensor:
        if not self.on(peer):
            return agg
        e = torch.ones_like(agg)
        return agg + e / e.norm() * self.scale * (float(agg.norm()) + 1e-3)


class EquivocateAggregate(ProtocolAttack):
    """As aggregator, send a different ĝ[j] to half of the peers than what it committed."""

    name = "equivocate-aggregate"

    def aggregate(self, peer: BtardPeer, j: int, dest: bytes, agg: torch.Tensor) -> torch.Tensor:
        if self.on(peer) and dest[0] % 2:
            return agg + 1.0
        return agg


class EquivocateCommit(ProtocolAttack):
    """Broadcast a second, different GRAD_COMMIT to half of the peers."""

    name = "equivocate-commit"

    def extra_messages(self, peer, phase):
        if phase != Phase.COMMIT or not self.on(peer) or peer.gradient is None:
            return []
        fake = tuple(bytes(32) for _ in peer.bounds)
        dests = tuple(p for p in peer.members if p != peer.id and p[0] % 2)
        return [(GradCommit(peer.cfg.run_id, peer.step, peer.id, peer.params_hash, fake), dests)]


class CommitMismatch(ProtocolAttack):
    """Send gradient parts that differ from the committed hashes."""

    name = "commit-mismatch"

    def grad_part(self, peer, j, dest, part):
        return part + 1.0 if self.on(peer) else part


class BadShapePart(ProtocolAttack):
    """Send gradient parts of the wrong length (signed, so provable)."""

    name = "bad-shape"

    def grad_part(self, peer, j, dest, part):
        return torch.cat([part, part[:1]]) if self.on(peer) else part


class NaNPart(ProtocolAttack):
    """Commit to and send gradient parts containing NaN."""

    name = "nan-part"

    def gradient(self, peer, g):
        if not self.on(peer):
            return g
        g = g.clone()
        g[::7] = float("nan")
        return g


class LyingProjections(ProtocolAttack):
    """Report false projections s (alone: the honest aggregators catch it with the signed part)."""

    name = "lying-projections"

    def projections(self, peer, norms, projs):
        if not self.on(peer):
            return norms, projs
        return norms, projs + np.sign(projs + 1e-30) * norms[:, None] * 2.0


@dataclass
class Coalition:
    """Shared knowledge of colluding attackers: the shift each Byzantine aggregator applied, per (step, part)."""

    members: set[bytes] = field(default_factory=set)
    shifts: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    parts: dict[tuple[int, int], dict[bytes, torch.Tensor]] = field(default_factory=dict)


class CollusiveAggregator(ProtocolAttack):
    """As aggregator, shift ĝ[j] by e with ‖e‖ = alpha · c·τ·b/(n − b) (the collusion bound of protocol.md
    §3.7), along a fixed direction; colluding senders then lie in their projections so that the fixed-point
    sum stays within tolerance (see `CollusiveReporter`)."""

    name = "collusive-aggregator"

    def __init__(self, coalition: Coalition, alpha: float = 0.5, start: int = 0) -> None:
        super().__init__(start)
        self.coalition = coalition
        self.alpha = alpha
        self.shift_norms: list[float] = []

    def agg_commit_value(self, peer, j, agg):
        if not self.on(peer):
            return agg
        parts = {
            p: peer.slots[(Kind.GRAD_PART, p, j)].msg.tensor()
            for p in peer.expected_senders(j)
            if (Kind.GRAD_PART, p, j) in peer.slots
        }
        dists = torch.stack([(v.double() - agg.double()).norm() for v in parts.values()])
        tau, _ = checks.clip_weights(
            dists, peer.cfg.tau, lam=peer.cfg.lam, ref_norm=float(agg.double().norm())
        )
        n, b = len(parts), len(self.coalition.members & set(parts))
        bound = peer.cfg.plausibility * tau * b / max(n - b, 1)
        u = torch.ones_like(agg) / agg.numel() ** 0.5
        e = u * self.alpha * bound
        self.shift_norms.append(float(e.norm()))
        self.coalition.shifts[(peer.step, j)] = e
        self.coalition.parts[(peer.step, j)] = parts
        return agg + e

    def projections(self, peer, norms, projs):
        return _collusive_projections(self.coalition, peer, norms, projs)

    def should_accuse(self, peer, accused, reason):
        return accused not in self.coalition.members


class CollusiveReporter(ProtocolAttack):
    """A Byzantine sender that reports projections cancelling its coalition aggregator's shift, within the
    plausibility bound |s| ≤ c·n (it inflates its reported norm n to gain room)."""

    name = "collusive-reporter"

    def __init__(self, coalition: Coalition, start: int = 0) -> None:
        super().__init__(start)
        self.coalition = coalition

    def projections(self, peer, norms, projs):
        return _collusive_projections(self.coalition, peer, norms, projs)


def _collusive_projections(coalition: Coalition, peer: BtardPeer, norms: np.ndarray, projs: np.ndarray):
    norms, projs = norms.copy(), projs.copy()
    liars = sorted(p for p in coalition.members if p in peer.committed)
    zs = peer.projection_vectors()
    for (step, j), parts in coalition.parts.items():
        if step != peer.step or peer.id not in parts:
            continue
        agg = peer.aggregate_part(j)
        senders = [p for p in peer.declared(j) if p in parts]
        vals = {p: checks.project(parts[p], agg, zs[j]) for p in senders}
        n = np.array([vals[p][0] for p in senders])
        # With each liar at distance τ-ish (weight 1), its s counts fully: solve for the cancelling total.
        t, w = checks.clip_weights(
            torch.from_numpy(n), peer.cfg.tau, lam=peer.cfg.lam, ref_norm=float(agg.double().norm())
        )
        w = w.numpy()
        honest_sum = sum(w[i] * vals[p][1] for i, p in enumerate(senders) if p not in coalition.members)
        my_liars = [p for p in liars if p in senders]
        share = -honest_sum / max(len(my_liars), 1)
        i = senders.index(peer.id)
        # Keep the reported norm at its true value (so τ and weights are unchanged) and clamp to plausibility.
        bound = peer.cfg.plausibility * 0.99 * norms[j]
        projs[j] = np.clip(share / max(w[i], 1e-12), -bound, bound)
    return norms, projs


class FalseAccusation(ProtocolAttack):
    """Accuse an honest peer of a commit mismatch, with evidence that does not prove it."""

    name = "false-accusation"

    def __init__(self, victim_index: int = 0, start: int = 0) -> None:
        super().__init__(start)
        self.victim_index = victim_index

    def extra_messages(self, peer, phase):
        if phase != Phase.PROJ or not self.on(peer):
            return []
        honest = [p for p in peer.committed if p != peer.id]
        if not honest:
            return []
        victim = honest[self.victim_index % len(honest)]
        commit = peer.slots.get((Kind.GRAD_COMMIT, victim, 0))
        if commit is None:
            return []
        msg = Accuse(
            peer.cfg.run_id, peer.step, peer.id, victim, peer.step, Reason.COMMIT_MISMATCH, 0, (commit.raw,)
        )
        return [(msg, peer.others())]


class FramingByOmission(ProtocolAttack):
    """As aggregator, pretend a victim's part never arrived (public re-send request) and leave it out."""

    name = "framing-by-omission"

    def __init__(self, victim_index: int = 0, start: int = 0) -> None:
        super().__init__(start)
        self.victim_index = victim_index

    def accept(self, peer: BtardPeer, s: Signed) -> bool:
        if not self.on(peer) or s.msg.kind != Kind.GRAD_PART:
            return True
        others = [p for p in peer.contributors if p != peer.id]
        return not others or s.msg.sender != others[self.victim_index % len(others)]


class WithholdReveal(ProtocolAttack):
    """Commit to an MPRNG secret and never reveal it (abort, to re-roll r^t)."""

    name = "mprng-withhold"

    def mprng_reveal(self, peer, secret):
        return None if self.on(peer) else secret


class AlterReveal(ProtocolAttack):
    """Reveal a secret different from the committed one (bias attempt)."""

    name = "mprng-alter"

    def mprng_reveal(self, peer, secret):
        return bytes(32) if self.on(peer) else secret


class Replay(ProtocolAttack):
    """Re-send its own signed messages of the previous step, and a message signed for another run."""

    name = "replay"

    def __init__(self, start: int = 0) -> None:
        super().__init__(start)
        self._saved: list[bytes] = []

    def extra_messages(self, peer, phase):
        out: list = []
        if phase == Phase.ACCUSE:
            self._saved = [s.raw for (k, p, _), s in peer.slots.items() if p == peer.id]
        if phase == Phase.COMMIT and self.on(peer):
            out = [(raw, peer.others()) for raw in self._saved]
            other_run = MprngReveal(b"another-run-0000", peer.step, peer.id, bytes(32))
            out.append((other_run, peer.others()))
        return out


class Malformed(ProtocolAttack):
    """Send garbage, truncated and oversized bytes (nothing attributable: rejected, not banned)."""

    name = "malformed"

    def extra_messages(self, peer, phase):
        if phase != Phase.COMMIT or not self.on(peer) or peer.gradient is None:
            return []
        good = GradPart.of(peer.cfg.run_id, peer.step, peer.id, 0, peer.gradient[:4])
        from btard.protocol.messages import encode

        raw = encode(good, peer.identity).raw
        oversized = b"\x00" * (Limits().max_message_bytes + 1)
        flipped = raw[:-1] + bytes([raw[-1] ^ 1])
        return [(b, peer.others()) for b in (b"garbage", raw[:20], raw[:-10], flipped, oversized)]


class Silent(ProtocolAttack):
    """Stops answering from `phase` on (as sender or as aggregator): sends nothing and answers no pull."""

    name = "silent"

    def __init__(self, phase: Phase = Phase.SCATTER, start: int = 0) -> None:
        super().__init__(start)
        self.phase = Phase(phase)

    def grad_part(self, peer, j, dest, part):
        return None if self.on(peer) and self.phase <= Phase.SCATTER else part

    def answers_pulls(self, peer) -> bool:
        return not self.on(peer)


PROTOCOL_ATTACKS: dict[str, type[ProtocolAttack]] = {
    cls.name: cls
    for cls in (
        WrongAggregate,
        EquivocateAggregate,
        EquivocateCommit,
        CommitMismatch,
        BadShapePart,
        NaNPart,
        LyingProjections,
        CollusiveAggregator,
        CollusiveReporter,
        FalseAccusation,
        FramingByOmission,
        WithholdReveal,
        AlterReveal,
        Replay,
        Malformed,
        Silent,
    )
}
