"""One peer of BTARD-SGD as a sans-IO state machine.

Inputs: `begin_step` (with the locally computed gradient), `receive` (bytes from the network) and `tick`
(the time). Outputs: `events()` drains `Event`s (`events.py`): `Send` (bytes for the caller to deliver),
`PhaseEntered` and one `StepResult` per step. It never touches sockets, threads or clocks. Gradients of other
peers (for validation and for resolving a validator's accusation) come from a `GradientOracle` callback.

The package is split the way h11 splits a connection: the phase table (`state.py`), the per-phase agreement
(`agreement.py`), proofs (`evidence.py`) and the step's decision (`decision.py`) are pure and tested apart; this
module moves messages between them. It is one file because the message handlers share the step's slots, the
running agreement and the outbox; what it decides, it decides through those pure functions.
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from btard.aggregation import centered_clip
from btard.crypto import Identity, digest, short_id, tensor_digest
from btard.protocol import checks
from btard.protocol.agreement import PhaseAgreement, default_rounds
from btard.protocol.behaviour import Behaviour
from btard.protocol.config import JOIN_WINDOW, ProtocolConfig
from btard.protocol.decision import (
    Agreed,
    Prior,
    StepFacts,
    assign_aggregators,
    bounds_of,
    choose_validators,
    committed_of,
    decide,
    live_of,
    load_aggregate_part,
    shared_random,
)
from btard.protocol.errors import LocalProtocolError, MalformedMessage
from btard.protocol.events import BanReason, Event, PhaseEntered, Send, StepResult, Verdict
from btard.protocol.evidence import (
    PART_REASONS,
    StepView,
    about_grad_part,
    mprng_digest,
    proj_entry_ok,
    resolve,
    shape_problem,
)
from btard.protocol.messages import (
    MAX_PHASE_HINT_MS,
    Accuse,
    AggCommit,
    AggPart,
    DecodeCache,
    Digest,
    GradCommit,
    GradPart,
    Kind,
    Leave,
    Message,
    MprngCommit,
    MprngReveal,
    Proj,
    Pull,
    Reason,
    Signed,
    decode,
    encode,
)
from btard.protocol.state import BARRIER_KINDS, CONTENT_KINDS, KIND_PHASE, NEXT_PHASE, Phase, phase_start
from btard.protocol.step_state import StepState

GENESIS = digest("genesis")
_KIND_VALUES = frozenset(int(k) for k in Kind)
_KINDS: dict[int, Kind] = {int(k): k for k in Kind}
_BARRIER_PHASES = frozenset(int(p) for p in BARRIER_KINDS)
# A peer buffers messages of the next step only (peers finish a step at slightly different times); at most
# this many per sender, which covers every message an honest peer sends in one step for n ≤ 1024.
MAX_BUFFERED_PER_SENDER = 64
# An aggregated part listed by a digest but missing here is pulled this many phase timeouts after the listing
# (at once when its aggregator's own digest already came): see `BtardPeer._pull_due`.
PART_PULL_GRACE = 0.25
# A listed item still missing this many phase timeouts after it was first wanted is asked of every member once.
REPULL_AFTER = 0.5
# Bounds on what one sender can make a peer keep in one step: versions of one slot (two prove equivocation),
# versions of one round message, accusations (an honest peer makes a few per misbehaving peer).
MAX_VERSIONS = 2
MAX_ACCUSATIONS_PER_SENDER = 64
__all__ = [  # what the package's users import from here
    "GENESIS",
    "BanReason",
    "Behaviour",
    "BtardPeer",
    "Event",
    "GradientOracle",
    "PhaseEntered",
    "ProtocolConfig",
    "Send",
    "StepResult",
    "Verdict",
    "choose_validators",
]

GradientOracle = Callable[[int, bytes], torch.Tensor]
"""(step, peer id) -> the gradient that peer must have computed at that step (from public data)."""


@dataclass
class _StepRecord:
    """What a later step needs from step t (validation and accusations about it)."""

    step: int
    r: bytes
    bounds: list[tuple[int, int]]
    published: dict[int, torch.Tensor]  # the aggregate parts everyone projected against (valid ones only)
    commits: dict[bytes, Signed]
    projs: dict[bytes, Signed]


class BtardPeer:
    """The protocol state of one peer across steps. See the module docstring for the I/O contract."""

    def __init__(
        self,
        identity: Identity,
        config: ProtocolConfig,
        members: Sequence[bytes],
        *,
        oracle: GradientOracle | None = None,
        behaviour: Behaviour | None = None,
        start_step: int = 0,
        r_prev: bytes = GENESIS,
        validators: dict[bytes, bytes] | None = None,
        secret_source: Callable[[int], bytes] = os.urandom,
        projection_cache: checks.ProjectionCache | None = None,
        decode_cache: DecodeCache | None = None,
        check_cache: checks.CheckCache | None = None,
        audit: Callable[[str, object], None] | None = None,
        observers: Sequence[bytes] = (),
        probation: dict[bytes, int] | None = None,
        admit: Callable[[bytes], bool] | None = None,
        phase_timeout: float | None = None,
    ) -> None:
        self.identity = identity
        self.id = identity.peer_id
        self.cfg = config
        self.oracle = oracle
        self.behaviour = behaviour or Behaviour()
        self.members: tuple[bytes, ...] = tuple(sorted(members))
        if self.id not in self.members:
            raise LocalProtocolError("this peer is not in the member list")
        self.step = start_step
        self.r_prev = r_prev
        self.validators: dict[bytes, bytes] = dict(validators or {})
        # Joiners in their first step as members: they receive and take part in the MPRNG, but neither commit
        # nor validate (they are still fetching the state). Then on probation until (inclusive) the given step.
        self.observers: frozenset[bytes] = frozenset(observers)
        self.probation: dict[bytes, int] = dict(probation or {})
        self._admit = admit or (lambda pid: True)
        self._leaving = False
        # The phase timeout of the current step (agreed: derived at the end of each step from signed reports).
        self.phase_timeout = float(phase_timeout) if phase_timeout is not None else config.phase_timeout
        self._phase_hint_ms = 0
        self.banned: set[bytes] = set()
        self.phase = Phase.IDLE
        self._secret_source = secret_source
        self._zcache = projection_cache or checks.ProjectionCache()
        self._dcache = decode_cache
        self._ccache = check_cache
        self._audit = audit or (lambda kind, obj: None)
        self._outbox: list[object] = []
        self._records: dict[int, _StepRecord] = {}
        self._buffer: dict[bytes, list[bytes]] = defaultdict(list)
        self._prev: tuple[int, dict, dict] | None = None  # the last finished step's messages, to answer pulls
        self._carry: list[Accuse] = []  # own accusations the last step did not agree on: re-sent in this one
        self.rounds = default_rounds(len(self.members), config.max_faulty)
        self.rejected = 0
        # Views of the membership, recomputed when `members`, `validators`, `observers` or `banned` change.
        self._contrib_key: tuple | None = None
        self._contrib: tuple[bytes, ...] = ()
        self._contrib_set: frozenset[bytes] = frozenset()
        self._members_key: tuple[bytes, ...] | None = None
        self._member_set: frozenset[bytes] = frozenset()
        self._others_key: tuple | None = None
        self._others_val: tuple[bytes, ...] = ()
        self._reset_step_state()
        self._audit("config", config)

    # ------------------------------------------------------------------ public API
    @property
    def is_validator(self) -> bool:
        return self.id in self.validators

    @property
    def contributors(self) -> tuple[bytes, ...]:
        """Members that commit a gradient this step (all but the validators and the observers)."""
        key = self._contrib_key
        if (
            key is None
            or key[0] is not self.members
            or key[1] is not self.validators
            or key[2] is not self.observers
            or key[3] != tuple(self.validators)
        ):
            self._contrib_key = (self.members, self.validators, self.observers, tuple(self.validators))
            self._contrib = tuple(
                p for p in self.members if p not in self.validators and p not in self.observers
            )
            self._contrib_set = frozenset(self._contrib)
        return self._contrib

    def _is_contributor(self, pid: bytes) -> bool:
        _ = self.contributors  # refreshes the set if the membership changed
        return pid in self._contrib_set

    def _is_member(self, pid: bytes) -> bool:
        if self._members_key is not self.members:
            self._members_key = self.members
            self._member_set = frozenset(self.members)
        return pid in self._member_set

    def on_probation(self, pid: bytes) -> bool:
        """Whether `pid` is on probation this step: it commits, projects and is validated, but sends no parts
        and aggregates none."""
        return self.probation.get(pid, -1) >= self.step

    @property
    def aggregating(self) -> tuple[bytes, ...]:
        """Contributors whose gradients are aggregated this step (and who aggregate): not on probation."""
        return tuple(p for p in self.contributors if not self.on_probation(p))

    @property
    def is_observer(self) -> bool:
        return self.id in self.observers

    # The step's state (`StepState`), read-only for drivers, behaviours and tests.
    slots = property(
        lambda self: self.st.slots, doc="(kind, sender, index) -> the step's message in that slot"
    )
    accusations = property(lambda self: self.st.accusations, doc="the step's accusations by digest")
    public = property(lambda self: self.st.public, doc="the step's public items by digest")
    gradient = property(
        lambda self: self.st.gradient, doc="this peer's gradient of the step (None: validator)"
    )
    params_hash = property(lambda self: self.st.params_hash, doc="H(x^t) this peer committed to")
    committed = property(lambda self: self.st.committed, doc="contributors whose commit was agreed")
    aggregators = property(lambda self: self.st.aggregators, doc="part -> its aggregator")
    r = property(lambda self: self.st.r, doc="r^t once the MPRNG closed")
    bounds = property(lambda self: self.st.bounds, doc="the parts' [start, end) ranges")
    order = property(lambda self: self.st.order, doc="the part order drawn from r^{t−1}")

    # Read-only views of the step for behaviours (attacks model what honest peers compute).
    def others(self) -> tuple[bytes, ...]:
        """Members of this step other than this peer and not banned."""
        return self._others()

    def projection_vectors(self) -> list[torch.Tensor]:
        """z(r^t) per part (after MPRNG_REVEAL)."""
        return self._zs()

    def expected_senders(self, j: int) -> list[bytes]:
        """Whose part j its aggregator must include (committed, not proven bad for part j, not on probation)."""
        return self._expected_senders(j)

    def declared(self, j: int) -> tuple[bytes, ...]:
        """The senders part j's aggregator declared in its AGG_COMMIT."""
        return self._declared(j)

    def aggregate_part(self, j: int) -> torch.Tensor | None:
        """ĝ[j] as agreed (None if missing, mismatched or non-finite)."""
        return self._aggregate_part(j)

    def events(self) -> list[object]:
        out, self._outbox = self._outbox, []
        return out

    @property
    def next_deadline(self) -> float | None:
        phase = self.phase
        if phase == Phase.IDLE or phase == Phase.DONE:
            return None
        cands = list(self.st.pull_due.values())
        ag = self.st.ag
        if ag is not None and not ag.closed:
            cands.append(ag.deadline())
        if phase == Phase.SCATTER and self.st.scatter_deadlines:
            cands.append(self.st.scatter_deadlines[-1])
        return min(cands) if cands else None

    def begin_step(self, now: float, params_hash: bytes, gradient: torch.Tensor | None) -> None:
        """Start step `self.step`. Contributors pass their gradient; validators pass None."""
        if self.phase not in (Phase.IDLE,):
            raise LocalProtocolError(f"begin_step in phase {self.phase.name}")
        if (self.is_validator or self.is_observer) != (gradient is None):
            raise LocalProtocolError(
                "validators and observers pass gradient=None, contributors pass their gradient"
            )
        self._reset_step_state()
        self._prior = Prior(
            self.step,
            self.members,
            dict(self.validators),
            self.observers,
            dict(self.probation),
            frozenset(self.banned),
            self.r_prev,
            self.phase_timeout,
        )
        self._audit("begin", self._prior)
        self.rounds = default_rounds(len(self.members), self.cfg.max_faulty)
        self.st.t0 = now
        self.st.params_hash = params_hash
        self.st.bounds = bounds_of(self.cfg, self._prior)
        self.st.order = checks.part_order(self._prior.aggregating, self.r_prev)
        self._outbox.append(PhaseEntered(self.step, Phase.COMMIT))
        if gradient is not None:
            g = self.behaviour.gradient(self, gradient.detach().to(torch.float32).reshape(-1))
            if g.numel() != self.cfg.dim:
                raise LocalProtocolError(f"gradient has {g.numel()} elements, expected {self.cfg.dim}")
            self.st.gradient = g
            hashes = [
                tensor_digest("grad-part", self.cfg.run_id, self.step, self.id, j, g[a:b])
                for j, (a, b) in enumerate(self.st.bounds)
            ]
            hashes = self.behaviour.commit_hashes(self, hashes)
            self._broadcast(GradCommit(self.cfg.run_id, self.step, self.id, params_hash, tuple(hashes)))
        self._enter(Phase.COMMIT, now, announce=False)  # announced before the commit went out (above)
        if self._leaving:
            self._add_public(self._broadcast(Leave(self.cfg.run_id, self.step, self.id)))
        if self.is_validator:
            self._validate(self.validators[self.id])
        carry, self._carry = self._carry, []
        for a in carry:  # decided in this step's agreement (lagged finalization)
            self._broadcast(
                Accuse(a.run_id, self.step, self.id, a.accused, a.about_step, a.reason, a.part, a.evidence)
            )
        for raw in [r for lst in self._buffer.values() for r in lst]:
            self.receive(raw, now)
        self._buffer.clear()
        self._advance(now)

    def receive(self, raw: bytes, now: float) -> None:
        """Take one message from the network. Never raises on bad input: it is counted and dropped."""
        try:
            if not isinstance(raw, bytes | bytearray | memoryview):
                raise MalformedMessage("bad-type", "message must be bytes")
            raw = bytes(raw)
            s = self._dcache.decode(raw, self.cfg.limits) if self._dcache else decode(raw, self.cfg.limits)
        except MalformedMessage as e:
            self._reject(f"malformed: {e}")
            return
        m = s.msg
        if m.run_id != self.cfg.run_id:
            self._reject("wrong run id (replay from another run?)")
            return
        if m.kind == Kind.JOIN:
            self._on_join(s)
            self._advance(now)
            return
        if not self._is_member(m.sender) or m.sender in self.banned:
            self._reject("sender is not an active member")
            return
        if m.kind == Kind.PULL and self._prev is not None and m.step == self._prev[0]:
            self._answer_old_pull(m)  # a slower peer still finishing the previous step
            return
        if m.step != self.step or self.phase in (Phase.IDLE, Phase.DONE):
            if m.step == self.step + (0 if self.phase == Phase.IDLE else 1):
                lst = self._buffer[m.sender]
                if len(lst) < MAX_BUFFERED_PER_SENDER:
                    lst.append(bytes(raw))
                else:
                    self._reject("too many early messages")
            else:
                self._reject(f"message for step {m.step} during step {self.step} (replay or stale)")
            return
        if not self.behaviour.accept(self, s):
            return
        self._handle(s, now)
        self._advance(now)

    def tick(self, now: float) -> None:
        self._advance(now)

    def report_phase_time(self, seconds: float) -> None:
        """The caller's measure of its slowest phase in the step just finished (0 when a deadline had to pass:
        such a step measures the timeout, not the work). Sent in the next MPRNG commit; the median over the
        members sets the next timeouts, so a minority cannot move it outside the honest peers' range."""
        self._phase_hint_ms = max(0, min(int(seconds * 1000), MAX_PHASE_HINT_MS))

    def leave(self) -> None:
        """Leave gracefully: the next step to begin (`begin_step`) is this peer's last; it takes part in it
        fully and every honest member drops it from the following step's members (`StepResult.left`)."""
        self._leaving = True

    def _on_join(self, s: Signed) -> None:
        """Keep a fresh JOIN of an admissible outsider with this step's public items (bounded). Between
        steps it is dropped: the joiner re-sends until it is admitted."""
        m = s.msg
        if m.sender in self.members or m.sender in self.banned or not self._admit(m.sender):
            self._reject("join from a member, a banned or a not admitted peer")
            return
        if not self.step - JOIN_WINDOW <= m.step <= self.step + 1:
            self._reject(f"join for step {m.step} during step {self.step} (stale or replayed)")
            return
        if s.msg_digest in self.st.public or self.phase in (Phase.IDLE, Phase.DONE):
            return
        if len(self._public_senders(Kind.JOIN)) >= self.cfg.limits.max_peers:
            self._reject("too many joins this step")
            return
        self._add_public(s)

    # ------------------------------------------------------------------ step state
    def _reset_step_state(self) -> None:
        self.st = StepState()

    def _enter(self, phase: Phase, now: float, announce: bool = True) -> None:
        if announce:
            self._outbox.append(PhaseEntered(self.step, phase))
        self.phase = phase
        kinds = BARRIER_KINDS.get(phase)
        self.st.expect = self._expected(phase)
        self.st.missing = {k for k in self.st.expect if k not in self.st.slots}
        self.st.ag = None
        if kinds:
            start = self.st.t0 + phase_start(phase, self.rounds) * self.phase_timeout
            self.st.ag = ag = PhaseAgreement(
                me=self.id,
                members=frozenset(self.members) - self.banned,
                rounds=self.rounds,
                start=start,
                timeout=self.phase_timeout,
                origin_signs=phase != Phase.ACCUSE,
                timed_out=self.st.timed_out,
            )
            self.st.pull_due.clear()
            if phase == Phase.ACCUSE:
                items = self._public_items()
                for x in items.values():
                    ag.hold(x.msg_digest, _item_ref(x), x.msg.sender)
                entries = tuple((*_item_ref(x), d) for d, x in items.items())
                self._round_message(phase, 1, entries, ())  # the manifest: round 1 of this phase
            else:
                for slot, vers in self.st.versions.items():
                    if slot[0] in kinds:
                        for v in vers:
                            ag.hold(v.msg_digest, _item_ref(v), v.msg.sender)
            early, self.st.early_rounds = self.st.early_rounds, []
            for r in early:
                self._on_digest(r, now)
        for msg, dests in self.behaviour.extra_messages(self, phase):
            raw = msg if isinstance(msg, bytes) else encode(msg, self.identity).raw
            self._outbox.append(Send(tuple(dests), raw))

    def _round_message(
        self, phase: Phase, k: int, entries: tuple, forward: Sequence[tuple[bytes, bytes]]
    ) -> None:
        """Broadcast this peer's round-k DIGEST of `phase` and the support messages it forwards."""
        s = self._broadcast(
            Digest(self.cfg.run_id, self.step, self.id, int(phase), k, entries, tuple(d for d, _ in forward))
        )
        for _, raw in forward:
            self._outbox.append(Send(self._others(), raw))
        self.st.ag.on_round_message(self.id, k, s.msg_digest, entries, s.raw)

    # ------------------------------------------------------------------ sending
    def _others(self) -> tuple[bytes, ...]:
        key = self._others_key
        if key is None or key[0] is not self.members or key[1] != len(self.banned):
            self._others_key = (self.members, len(self.banned))  # `banned` only grows
            self._others_val = tuple(p for p in self.members if p != self.id and p not in self.banned)
        return self._others_val

    def _put_slot(self, key: tuple, s: Signed) -> None:
        """Fill a slot (first version), keeping `_missing` and `_versions` in step with `slots`."""
        self.st.slots[key] = s
        vers = self.st.versions.setdefault(key, [])
        if all(v.msg_digest != s.msg_digest for v in vers):
            vers.append(s)
        self.st.missing.discard(key)

    def _add_public(self, s: Signed) -> None:
        """Keep a public item of this step (agreed on in the ACCUSE phase)."""
        if s.msg_digest in self.st.public:
            return
        self.st.public[s.msg_digest] = s
        self._audit("msg", s)
        self._feed(s, public=True)

    def _sign(self, msg: Message) -> Signed:
        s = encode(msg, self.identity)
        self._audit("msg", s)
        own = self.st.own.setdefault(msg.kind, {})
        own[s.msg_digest if msg.kind == Kind.ACCUSE else msg.slot()] = s
        if msg.kind in CONTENT_KINDS:
            slot = msg.slot()
            if slot not in self.st.slots:
                self._put_slot(slot, s)
                self._feed(s)
            if msg.kind in (Kind.AGG_PART, Kind.AGG_COMMIT):
                self.st.agg_cache.pop(msg.part, None)
        elif msg.kind == Kind.ACCUSE:
            self.st.accusations[s.msg_digest] = s
            self._feed(s)
        return s

    def _feed(self, s: Signed, public: bool = False) -> None:
        """Hand a held item to the running agreement if it is of the current phase's kinds (accusations and
        `public` items are ACCUSE-phase items)."""
        ag, m = self.st.ag, s.msg
        if ag is None:
            return
        of_phase = Phase.ACCUSE if public or m.kind == Kind.ACCUSE else KIND_PHASE.get(m.kind)
        if of_phase == self.phase:
            ag.hold(s.msg_digest, _item_ref(s), m.sender)

    def _broadcast(self, msg: Message) -> Signed:
        s = self._sign(msg)
        self._outbox.append(Send(self._others(), s.raw))
        return s

    def _send_to(self, dest: bytes, msg: Message) -> Signed:
        s = self._sign(msg)
        if dest != self.id:
            self._outbox.append(Send((dest,), s.raw))
        return s

    def _accuse(
        self, accused: bytes, reason: Reason, part: int, evidence: Sequence[Signed], about: int
    ) -> None:
        key = (accused, reason, part, about)
        if key in self.st.accused_slots or not self.behaviour.should_accuse(self, accused, reason):
            return
        self.st.accused_slots.add(key)
        self._broadcast(
            Accuse(
                self.cfg.run_id,
                self.step,
                self.id,
                accused,
                about,
                reason,
                part,
                tuple(e.raw for e in evidence),
            )
        )

    def _reject(self, why: str) -> None:
        self.rejected += 1
        self._audit("reject", {"step": self.step, "peer": short_id(self.id), "why": why})

    # ------------------------------------------------------------------ receiving
    def _handle(self, s: Signed, now: float) -> None:
        m = s.msg
        if m.kind == Kind.DIGEST:
            self._on_digest(s, now)
            return
        if m.kind == Kind.PULL:
            if m.want_kind not in _KIND_VALUES:
                self._reject(f"pull for unknown message kind {m.want_kind}")
                return
            if m.public and m.want_kind == Kind.GRAD_PART and m.sender == self.st.aggregators.get(m.index):
                self._add_public(s)
            self._on_pull(m)
            return
        if m.kind == Kind.ACCUSE:
            if s.msg_digest in self.st.accusations:
                return
            if self.st.accusations_from[m.sender] >= MAX_ACCUSATIONS_PER_SENDER:
                self._reject("too many accusations from one sender")
                return
            self.st.accusations_from[m.sender] += 1
            self.st.accusations[s.msg_digest] = s
            self._audit("msg", s)
            self._feed(s)
            return
        if m.kind == Kind.LEAVE:
            self._add_public(s)
            return
        if not self._role_ok(m):
            self._reject(f"{m.kind.name} from {short_id(m.sender)} does not fit its role")
            return
        problem = shape_problem(m, len(self.st.bounds), self.cfg.num_projections)
        if problem is not None:  # signed and malformed for this step: evidence against its sender
            self._reject(f"{m.kind.name} from {short_id(m.sender)}: {problem}")
            self._audit("msg", s)
            self._accuse(m.sender, Reason.BAD_SHAPE, 0, (s,), self.step)
            return
        if m.kind == Kind.GRAD_PART and self.phase != Phase.COMMIT:
            agg = self.st.aggregators.get(m.part)
            if agg != self.id or (m.sender, m.part) in self._my_public_pulls():
                self._add_public(s)  # a public re-send (only the aggregator gets parts otherwise)
            if agg != self.id:
                return
        slot = m.slot()
        vers = self.st.versions.get(slot, [])
        if any(v.msg_digest == s.msg_digest for v in vers):
            return
        of_phase = KIND_PHASE.get(m.kind)
        closed = of_phase is not None and self.phase > of_phase
        if vers:
            self._audit("msg", s)
            self._accuse(m.sender, Reason.EQUIVOCATION, getattr(m, "part", 0), (vers[0], s), self.step)
            listed = self.st.ag is not None and s.msg_digest in self.st.ag.listers
            if not closed and (len(vers) < MAX_VERSIONS or listed):
                # Versions go to the agreement (beyond two only those some member listed, so memory stays
                # bounded by the round messages): if two are agreed, the slot is void everywhere.
                vers.append(s)
                self._feed(s)
            return
        if closed:
            self._reject(f"{m.kind.name} from {short_id(m.sender)} after its phase closed")
            return
        self._put_slot(slot, s)
        self._feed(s)
        self._audit("msg", s)
        if m.kind == Kind.GRAD_PART:
            if self.phase == Phase.SCATTER:
                self._verify_part(s)
        elif m.kind in (Kind.AGG_PART, Kind.AGG_COMMIT):
            self.st.agg_cache.pop(m.part, None)
            self._check_agg_pair(m.part)
        elif m.kind == Kind.MPRNG_REVEAL:
            self._check_reveal(m.sender)
        elif m.kind == Kind.GRAD_COMMIT:
            for j in range(len(self.st.bounds)):
                if self.st.aggregators.get(j) == self.id and (Kind.GRAD_PART, m.sender, j) in self.st.slots:
                    self._verify_part(self.st.slots[(Kind.GRAD_PART, m.sender, j)])

    def _my_public_pulls(self) -> set[tuple[bytes, int]]:
        return {
            (x.msg.origin, x.msg.index)
            for x in self.st.public.values()
            if x.msg.kind == Kind.PULL and x.msg.sender == self.id and x.msg.public
        }

    def _role_ok(self, m: Message) -> bool:
        if m.kind in (Kind.GRAD_COMMIT, Kind.PROJ, Kind.GRAD_PART):
            if not self._is_contributor(m.sender):
                return False
            if m.kind == Kind.GRAD_PART and self.on_probation(m.sender):
                return False
            return m.kind != Kind.GRAD_PART or 0 <= m.part < len(self.st.bounds)
        if m.kind in (Kind.AGG_COMMIT, Kind.AGG_PART):
            if not 0 <= m.part < len(self.st.bounds):
                return False
            agg = self.st.aggregators.get(m.part)
            return agg == m.sender if agg is not None else self._is_contributor(m.sender)
        return True

    def _on_digest(self, s: Signed, now: float) -> None:
        """A round message of some phase's agreement: counted toward its items' signers (see `agreement.py`)."""
        m: Digest = s.msg
        if m.phase not in _BARRIER_PHASES or m.round > self.rounds:
            self._reject(f"round message for phase {m.phase} round {m.round}")
            return
        key = (m.sender, m.phase, m.round)
        if self.st.round_versions.get(key, 0) >= MAX_VERSIONS:
            return
        self.st.round_versions[key] = self.st.round_versions.get(key, 0) + 1
        if m.phase > self.phase:
            self.st.early_rounds.append(s)  # bounded: MAX_VERSIONS per (sender, phase, round)
            return
        ag = self.st.ag
        if m.phase < self.phase or ag is None or ag.closed:
            return  # that phase's set is final
        ag.on_round_message(m.sender, m.round, s.msg_digest, m.entries, s.raw)
        ag.expect_support(m.support, m.sender)
        self._pull_wanted(now)

    def _pull_wanted(self, now: float) -> None:
        """Pull every listed item that could still be accepted and is not held: from its listers when due
        (an aggregated part after a grace, as it is usually on its way), then once from every member."""
        ag = self.st.ag
        if ag is None or ag.closed:
            return
        self.st.pull_due.clear()
        by_digest = self.phase == Phase.ACCUSE
        for h, (kind, origin, idx), listers in ag.wanted():
            since = self.st.want_since.setdefault(h, now)
            due = since
            if kind == Kind.AGG_PART and origin not in ag.heard.get(2, ()):
                due = since + PART_PULL_GRACE * self.phase_timeout
            pull = Pull(
                self.cfg.run_id,
                self.step,
                self.id,
                int(Kind.ACCUSE) if by_digest else kind,
                h if by_digest else origin,
                0 if by_digest else idx,
            )
            ask = [p for p in listers if p != self.id and (h, p) not in self.st.pulled]
            if ask and now >= due:
                for holder in ask:
                    self.st.pulled.add((h, holder))
                    self._send_to(holder, pull)
                ask = []
            retry = since + REPULL_AFTER * self.phase_timeout
            if h not in self.st.repulled and now >= retry:
                # the first pull (or its answer) may have been lost: ask everyone once
                self.st.repulled.add(h)
                self._broadcast(pull)
            elif h not in self.st.repulled:
                self.st.pull_due[h] = min(due, retry) if ask else retry

    def _public_senders(self, kind: Kind) -> set[bytes]:
        """Senders of this step's public items of `kind` (JOIN, LEAVE)."""
        return {x.msg.sender for x in self.st.public.values() if x.msg.kind == kind}

    def _public_items(self) -> dict[bytes, Signed]:
        return {**self.st.accusations, **self.st.public}

    @staticmethod
    def _slot_key(kind: int, origin: bytes, idx: int) -> tuple:
        return (Kind(kind), origin, idx)

    def _answer_old_pull(self, m: Pull) -> None:
        _, slots, public = self._prev
        if m.want_kind == Kind.ACCUSE:
            item = public.get(m.origin)
        elif m.want_kind in _KIND_VALUES:
            item = slots.get((Kind(m.want_kind), m.origin, m.index))
        else:
            item = None
        if item is not None and self.behaviour.answers_pulls(self):
            self._outbox.append(Send((m.sender,), item.raw))

    def _on_pull(self, m: Pull) -> None:
        if not self.behaviour.answers_pulls(self):
            return
        if m.want_kind == Kind.ACCUSE:  # by digest: accusations and public items
            item = self.st.accusations.get(m.origin) or self.st.public.get(m.origin)
            found = [item] if item is not None else []
        else:  # by slot: every version held (an equivocation's second version is an item too)
            found = list(self.st.versions.get(self._slot_key(m.want_kind, m.origin, m.index), ()))
        if m.public:
            # The public re-send request for a missing gradient part: its owner re-sends it to everyone.
            if m.origin == self.id and self.st.gradient is not None and 0 <= m.index < len(self.st.bounds):
                self._resend_publicly(m.index)
            return
        for s in found:
            self._outbox.append(Send((m.sender,), s.raw))

    # ------------------------------------------------------------------ parts
    def _expected_part_len(self, j: int) -> int:
        a, b = self.st.bounds[j]
        return b - a

    def _verify_part(self, s: Signed) -> bool:
        """Aggregator-side checks of a received part; accuses with evidence and excludes it when bad."""
        m: GradPart = s.msg
        j = m.part
        commit = self.st.slots.get((Kind.GRAD_COMMIT, m.sender, 0))
        if len(m.data) // 4 != self._expected_part_len(j):
            self._accuse(m.sender, Reason.BAD_SHAPE, j, (s,), self.step)
            return False
        if not m.all_finite:
            self._accuse(m.sender, Reason.NONFINITE, j, (s,), self.step)
            return False
        if commit is None:
            return False
        h = m.data_digest("grad-part", self.cfg.run_id, self.step, m.sender, j)
        if len(commit.msg.part_hashes) != len(self.st.bounds) or commit.msg.part_hashes[j] != h:
            self._accuse(m.sender, Reason.COMMIT_MISMATCH, j, (commit, s), self.step)
            return False
        return True

    def _check_agg_pair(self, j: int) -> None:
        c = self.st.slots.get((Kind.AGG_COMMIT, self.st.aggregators.get(j, b""), j))
        p = self.st.slots.get((Kind.AGG_PART, self.st.aggregators.get(j, b""), j))
        if c is None or p is None:
            return
        h = p.msg.data_digest("agg-part", self.cfg.run_id, self.step, p.msg.sender, j)
        if h != c.msg.agg_hash:
            self._accuse(p.msg.sender, Reason.EQUIVOCATION, j, (c, p), self.step)
        elif len(p.msg.data) // 4 != self._expected_part_len(j):
            self._accuse(p.msg.sender, Reason.BAD_SHAPE, j, (p,), self.step)
        elif not p.msg.all_finite:
            self._accuse(p.msg.sender, Reason.NONFINITE, j, (p,), self.step)

    def _check_reveal(self, sender: bytes) -> None:
        c = self.st.slots.get((Kind.MPRNG_COMMIT, sender, 0))
        r = self.st.slots.get((Kind.MPRNG_REVEAL, sender, 0))
        if (
            c is not None
            and r is not None
            and mprng_digest(self.cfg.run_id, self.step, sender, r.msg.secret) != c.msg.commitment
        ):
            self._accuse(sender, Reason.MPRNG_MISMATCH, 0, (c, r), self.step)

    # ------------------------------------------------------------------ the driver
    def _advance(self, now: float) -> None:
        while True:
            before = self.phase
            self._step_phase(now)
            if self.phase == before or self.phase in (Phase.IDLE, Phase.DONE):
                return

    def _expected(self, phase: Phase) -> set[tuple]:
        if phase == Phase.COMMIT:
            return {(Kind.GRAD_COMMIT, p, 0) for p in self.contributors}
        if phase == Phase.AGGREGATE:
            exp = set()
            for j, a in self.st.aggregators.items():
                exp.add((Kind.AGG_COMMIT, a, j))
                exp.add((Kind.AGG_PART, a, j))
            return exp
        if phase == Phase.MPRNG_COMMIT:
            return {(Kind.MPRNG_COMMIT, p, 0) for p in self._live()}
        if phase == Phase.MPRNG_REVEAL:
            return {
                (Kind.MPRNG_REVEAL, p, 0) for p in self._live() if (Kind.MPRNG_COMMIT, p, 0) in self.st.slots
            }
        if phase == Phase.PROJ:
            return {(Kind.PROJ, p, 0) for p in self.st.committed}
        return set()

    def _live(self) -> tuple[bytes, ...]:
        """Members minus contributors that never committed (fixed once the commit barrier closed)."""
        if self.st.live_cache is None or self.phase <= Phase.COMMIT:
            self.st.live_cache = live_of(self._prior, self.st.committed)
        return self.st.live_cache

    def _step_phase(self, now: float) -> None:
        ph = self.phase
        if ph == Phase.SCATTER:
            self._scatter_progress(now)
            return
        ag = self.st.ag
        if ag is None or ph not in BARRIER_KINDS:
            return
        self._pull_wanted(now)
        if ph == Phase.COMMIT:
            live: tuple[bytes, ...] = self._others()
        else:
            alive = set(self._live())
            live = tuple(p for p in self._others() if p in alive)
        while not ag.closed:
            passed = now >= ag.deadline()
            if not passed and not ag.round_complete(live, bool(self.st.missing)):
                return
            out = ag.end_round(live, passed)
            if out is None:
                break
            new, forward = out
            self._round_message(ph, ag.round, tuple((*ag.held[d], d) for d in new), forward)
            self._pull_wanted(now)
        self._finalize_phase(ph)
        self._close(ph, now)

    def _finalize_phase(self, ph: Phase) -> None:
        """Keep exactly the agreed items of the phase that closed: a slot with one agreed version holds it, a
        slot with none is empty (whatever arrived here), a slot with two is void and proves equivocation."""
        agreed = self.st.ag.agreed()
        self.st.agreed_all |= agreed
        self.st.pull_due.clear()
        if ph == Phase.ACCUSE:
            self._carry = [
                x.msg
                for d, x in self.st.accusations.items()
                if d not in agreed and x.msg.sender == self.id and x.msg.step == self.step
            ]
            self.st.accusations = {d: x for d, x in self.st.accusations.items() if d in agreed}
            self.st.public = {d: x for d, x in self.st.public.items() if d in agreed}
            return
        kinds = BARRIER_KINDS[ph]
        for slot, vers in self.st.versions.items():
            if slot[0] not in kinds:
                continue
            acc = sorted((v for v in vers if v.msg_digest in agreed), key=lambda v: v.msg_digest)
            if len(acc) == 1:
                self.st.slots[slot] = acc[0]
            else:
                self.st.slots.pop(slot, None)
                if len(acc) >= 2:
                    self.st.equivocated[slot] = (acc[0], acc[1])
            if slot[0] in (Kind.AGG_PART, Kind.AGG_COMMIT):
                self.st.agg_cache.pop(slot[2], None)

    def _close(self, ph: Phase, now: float) -> None:
        if ph == Phase.COMMIT:
            self.st.committed = committed_of(self._prior, self.st.slots)
            self._assign_aggregators()
            self._enter(NEXT_PHASE[ph], now)
            self.st.scatter_deadlines = [
                self.st.t0 + (phase_start(Phase.SCATTER, self.rounds) + 1) * self.phase_timeout
            ]
            self._send_parts()
        elif ph == Phase.AGGREGATE:
            self._resend_omitted_parts()
            self._enter(NEXT_PHASE[ph], now)
            self.st.secret = self._secret_source(32)
            self._broadcast(
                MprngCommit(
                    self.cfg.run_id,
                    self.step,
                    self.id,
                    mprng_digest(self.cfg.run_id, self.step, self.id, self.st.secret),
                    self._phase_hint_ms,
                )
            )
        elif ph == Phase.MPRNG_COMMIT:
            self._enter(NEXT_PHASE[ph], now)
            secret = self.behaviour.mprng_reveal(self, self.st.secret)
            if secret is not None:
                self._broadcast(MprngReveal(self.cfg.run_id, self.step, self.id, secret))
        elif ph == Phase.MPRNG_REVEAL:
            self.st.r = self._shared_random()
            self._enter(NEXT_PHASE[ph], now)
            if self.st.gradient is not None and self.id in self.st.committed:
                self._send_projections()
        elif ph == Phase.PROJ:
            self._check_reports()
            self._enter(NEXT_PHASE[ph], now)
        elif ph == Phase.ACCUSE:
            self._finish()

    def _resend_omitted_parts(self) -> None:
        """Once the AGGREGATE set is agreed: re-send publicly every part whose agreed AGG_COMMIT leaves this
        peer out although it had to be aggregated. Whether an owner is silent is judged against that agreed
        commit (`decision._excluded`), which every honest peer holds before it enters ACCUSE, so the re-send is
        in its own manifest and agreed; a public PULL may reach the owner only inside the ACCUSE agreement."""
        if self.st.gradient is None or self.id not in self.st.committed or self.on_probation(self.id):
            return
        if not self.behaviour.answers_pulls(self):
            return
        for j, a in sorted(self.st.aggregators.items()):
            c = self.st.slots.get((Kind.AGG_COMMIT, a, j))
            if a != self.id and c is not None and self.id not in c.msg.included:
                self._resend_publicly(j, once=True)

    def _resend_publicly(self, j: int, once: bool = False) -> None:
        """Send this peer's part j to everyone and keep it as a public item (the same signed message it sent
        its aggregator, so it can never look like a second version); `once`: not if already public."""
        lo, hi = self.st.bounds[j]
        s = self.st.slots.get((Kind.GRAD_PART, self.id, j)) or self._sign(
            GradPart.of(self.cfg.run_id, self.step, self.id, j, self.st.gradient[lo:hi])
        )
        if once and s.msg_digest in self.st.public:
            return
        self._add_public(s)
        self._outbox.append(Send(self._others(), s.raw))

    def _assign_aggregators(self) -> None:
        self.st.aggregators = assign_aggregators(self.st.order, self.st.committed)

    def _send_parts(self) -> None:
        if self.st.gradient is None or self.id not in self.st.committed or self.on_probation(self.id):
            return
        for j, (a, b) in enumerate(self.st.bounds):
            dest = self.st.aggregators[j]
            part = self.behaviour.grad_part(self, j, dest, self.st.gradient[a:b])
            if part is None:
                continue
            msg = GradPart.of(self.cfg.run_id, self.step, self.id, j, part)
            if dest == self.id:
                s = self._sign(msg)
                self._put_slot((Kind.GRAD_PART, self.id, j), s)
            else:
                self._send_to(dest, msg)

    def _my_parts(self) -> list[int]:
        return [j for j, a in self.st.aggregators.items() if a == self.id]

    def _scatter_progress(self, now: float) -> None:
        """As aggregator: wait for my parts; at the first deadline ask publicly for the missing ones (their
        owners must re-send them to everyone); aggregate each part when complete or at the second deadline."""
        public_round = len(self.st.scatter_deadlines) > 1
        missing: dict[int, list[bytes]] = {}
        for j in self._my_parts():
            if j in self.st.my_parts_done:
                continue
            lacking = [p for p in self._expected_senders(j) if (Kind.GRAD_PART, p, j) not in self.st.slots]
            if not lacking or (public_round and now >= self.st.scatter_deadlines[-1]):
                self._aggregate(j)
            else:
                missing[j] = lacking
        if not missing:
            self.st.scatter_deadlines = []
            self._enter(NEXT_PHASE[Phase.SCATTER], now)
            return
        if not public_round and now >= self.st.scatter_deadlines[0]:
            self.st.scatter_deadlines.append(
                self.st.t0 + phase_start(Phase.AGGREGATE, self.rounds) * self.phase_timeout
            )
            for j, lacking in missing.items():
                for p in lacking:
                    pull = self._broadcast(
                        Pull(self.cfg.run_id, self.step, self.id, int(Kind.GRAD_PART), p, j, True)
                    )
                    self.st.public[pull.msg_digest] = pull

    def _expected_senders(self, j: int) -> list[bytes]:
        """Whose part j the aggregator must include: committed senders not proven bad for part j."""
        bad = self._proven_bad_part(j)
        return [p for p in self.st.committed if p not in bad and not self.on_probation(p)]

    def _declared(self, j: int) -> tuple[bytes, ...]:
        """The senders part j's aggregator declared it aggregated (from its AGG_COMMIT)."""
        c = self.st.slots.get((Kind.AGG_COMMIT, self.st.aggregators.get(j, b""), j))
        return c.msg.included if c is not None else ()

    def _proven_bad_part(self, j: int) -> set[bytes]:
        """Senders that part j's aggregator proved bad for part j of this step (a bad signed part)."""
        agg = self.st.aggregators.get(j)
        return {
            s.msg.accused
            for s in self.st.accusations.values()
            if s.msg.sender == agg
            and s.msg.part == j
            and s.msg.about_step == self.step
            and s.msg.reason in PART_REASONS
            and about_grad_part(s.msg, self.cfg.limits)
            and self._resolve(s) == s.msg.accused
        }

    def _aggregate(self, j: int) -> None:
        self.st.my_parts_done.add(j)
        senders = [
            p
            for p in self._expected_senders(j)
            if (Kind.GRAD_PART, p, j) in self.st.slots
            and self._verify_part(self.st.slots[(Kind.GRAD_PART, p, j)])
        ]
        length = self._expected_part_len(j)
        if senders:
            x = torch.from_numpy(  # one copy of the received bytes into a new (senders, length) tensor
                np.stack(
                    [np.frombuffer(self.st.slots[(Kind.GRAD_PART, p, j)].msg.data, "<f4") for p in senders]
                )
            )
            res = centered_clip(
                x, self.cfg.tau, lam=self.cfg.lam, eps_rel=self.cfg.eps_rel, max_iter=self.cfg.max_iter
            )
            agg = res.value.to(torch.float32)
            self.st.clip_iters += res.iterations
            self.st.clipped += res.n_clipped
        else:
            agg = torch.zeros(length)
        committed_value = self.behaviour.agg_commit_value(self, j, agg)
        h = tensor_digest("agg-part", self.cfg.run_id, self.step, self.id, j, committed_value)
        self._broadcast(AggCommit(self.cfg.run_id, self.step, self.id, j, h, tuple(senders)))
        last: Signed | None = None
        last_value: tuple[torch.Tensor, int] | None = None  # the tensor `last` was made from, and its version
        for dest in self.members:
            value = self.behaviour.aggregate(self, j, dest, committed_value)
            if dest != self.id and dest in self.banned:
                continue
            if last_value is not None and last_value[0] is value and last_value[1] == value._version:
                msg = last.msg  # the very tensor `last` was made from, not modified since
            else:
                msg = AggPart.of(self.cfg.run_id, self.step, self.id, j, value)
            if last is not None and last.msg == msg:
                s = last  # Ed25519 is deterministic: the same message signs to the same bytes
                self._audit("msg", s)
            else:
                s = last = self._sign(msg)  # the first one fills our own slot (AGG_PART, self, j)
                last_value = (value, value._version)
            if dest != self.id:
                self._outbox.append(Send((dest,), s.raw))

    # ------------------------------------------------------------------ MPRNG and projections
    def _shared_random(self) -> bytes:
        pr = self._prior
        return shared_random(self.cfg.run_id, pr.step, pr.r_prev, pr.members, self.st.slots)

    def _aggregate_part(self, j: int) -> torch.Tensor | None:
        """ĝ[j] as received, if its commit and part match, it has the right length and is finite (cached)."""
        if j not in self.st.agg_cache:
            self.st.agg_cache[j] = load_aggregate_part(
                self.cfg, self.step, self.st.slots, self.st.aggregators.get(j), j, self._expected_part_len(j)
            )
        return self.st.agg_cache[j]

    def _zs(self) -> list[torch.Tensor]:
        return [
            self._zcache.get(self.st.r, j, b - a, self.cfg.num_projections)
            for j, (a, b) in enumerate(self.st.bounds)
        ]

    def _send_projections(self) -> None:
        zs = self._zs()
        norms = np.zeros(len(self.st.bounds))
        projs = np.zeros((len(self.st.bounds), self.cfg.num_projections))
        for j, (a, b) in enumerate(self.st.bounds):
            agg = self._aggregate_part(j)
            if agg is not None:
                norms[j], projs[j] = checks.project(self.st.gradient[a:b], agg, zs[j])
        norms, projs = self.behaviour.projections(self, norms, projs)
        self._broadcast(Proj.of(self.cfg.run_id, self.step, self.id, norms, projs))

    def _check_reports(self) -> None:
        """As aggregator: recompute every sender's (n, s) for my parts and accuse liars with the signed part."""
        zs = self._zs()
        for j in self._my_parts():
            agg = self._aggregate_part(j)
            if agg is None:
                continue
            for p in self._declared(j):
                part = self.st.slots.get((Kind.GRAD_PART, p, j))
                proj = self.st.slots.get((Kind.PROJ, p, 0))
                if part is None or proj is None or p == self.id:
                    continue
                if not proj_entry_ok(self.cfg, proj.msg, j, part.msg, agg, zs[j], len(self.st.bounds)):
                    self._accuse(p, Reason.WRONG_PROJECTION, j, (part, proj), self.step)

    def _validate(self, target: bytes) -> None:
        """As validator of step t: recompute the target's step t−1 gradient and accuse it on a mismatch."""
        rec = self._records.get(self.step - 1)
        if rec is None or self.oracle is None or target not in rec.commits:
            return
        if not self._validation_passes(rec, target):
            ev = [rec.commits[target]] + ([rec.projs[target]] if target in rec.projs else [])
            self._accuse(target, Reason.VALIDATION, 0, ev, rec.step)

    def _validation_passes(self, rec: _StepRecord, target: bytes) -> bool:
        g = self.oracle(rec.step, target).detach().to(torch.float32).reshape(-1)
        commit: GradCommit = rec.commits[target].msg
        if self.cfg.validation_mode == "exact":
            hashes = tuple(
                tensor_digest("grad-part", self.cfg.run_id, rec.step, target, j, g[a:b])
                for j, (a, b) in enumerate(rec.bounds)
            )
            return hashes == commit.part_hashes
        proj = rec.projs.get(target)
        if proj is None or proj.msg.norms.shape[0] != len(rec.bounds):
            return True  # nothing reported to compare with (the peer was excluded as silent)
        parts = sorted(rec.published)
        if not parts:
            return True
        bounds = [rec.bounds[j] for j in parts]
        zs = [self._zcache.get(rec.r, j, b - a, self.cfg.num_projections) for j, (a, b) in zip(parts, bounds)]
        agg = torch.zeros(self.cfg.dim)
        for j, (a, b) in zip(parts, bounds):
            agg[a:b] = rec.published[j]
        norms, projs = checks.projections_for(g, agg, bounds, zs)
        dev = checks.validation_deviation(proj.msg.norms[parts], proj.msg.projections[parts], norms, projs)
        return dev <= checks.validation_tolerance(float(g.norm()), self.cfg.validation_rtol)

    # ------------------------------------------------------------------ evidence and the decision
    def _record_view(self, step: int) -> StepView | None:
        rec = self._records.get(step)
        if rec is None:
            return None
        k = self.cfg.num_projections
        return StepView(
            rec.step,
            rec.bounds,
            rec.commits,
            rec.published.get,
            lambda j: self._zcache.get(rec.r, j, rec.bounds[j][1] - rec.bounds[j][0], k),
        )

    def _view(self, step: int) -> StepView | None:
        """What evidence about `step` is checked against: this step's state, or the last step's record."""
        if step == self.step:
            return StepView(
                self.step,
                self.st.bounds,
                self._slots_by_sender(Kind.GRAD_COMMIT),
                self._aggregate_part,
                lambda j: self._zs()[j],
            )
        return self._record_view(step) if step == self.step - 1 else None

    def _validation(self, a: Accuse, ev: list[Signed]) -> bool | None:
        """Decide a validator's accusation about the previous step by recomputing the target's gradient."""
        rec = self._records.get(a.about_step)
        if rec is None or not ev or ev[0].msg.kind != Kind.GRAD_COMMIT:
            return False
        if rec.commits.get(a.accused) is None or rec.commits[a.accused].msg_digest != ev[0].msg_digest:
            return False
        if self.oracle is None:
            raise LocalProtocolError("resolving a validator's accusation needs a gradient oracle")
        return not self._validation_passes(rec, a.accused)

    def _resolve(self, s: Signed) -> bytes | None:
        """Who an accusation bans (see `evidence.resolve`), judged on this peer's view of the step."""
        return resolve(self.cfg, s, self.step, self._view, self._validation)

    def _slots_by_sender(self, kind: Kind) -> dict[bytes, Signed]:
        return {p: x for (k, p, _), x in self.st.slots.items() if k == kind}

    def _agreed_items(self) -> Agreed:
        slots = {k: v for k, v in self.st.slots.items() if k[0] in KIND_PHASE}
        return Agreed(slots, dict(self.st.equivocated), dict(self.st.accusations), dict(self.st.public))

    def _finish(self) -> None:
        """The step's decision (`decision.decide` on the agreed items), then the next step's state."""
        facts = StepFacts(
            self.cfg,
            self._prior,
            self._agreed_items(),
            zs=lambda r, j, n: self._zcache.get(r, j, n, self.cfg.num_projections),
            agg_cache=self.st.agg_cache,  # the parts this peer already loaded from the same agreed slots
        )
        out = decide(
            facts,
            previous=self._record_view(self.step - 1),
            validation=self._validation,
            check=self._ccache or checks,
        )
        self.banned |= {v.banned for v in out.verdicts}
        self._records[self.step] = _StepRecord(
            self.step,
            self.st.r,
            self.st.bounds,
            out.published,
            self._slots_by_sender(Kind.GRAD_COMMIT),
            self._slots_by_sender(Kind.PROJ),
        )
        self._records.pop(self.step - 2, None)
        self._prev = (self.step, self.st.slots, self._public_items())
        decided = {f.name: getattr(out, f.name) for f in dataclasses.fields(out) if f.name != "published"}
        result = StepResult(
            step=self.step,
            members=self.members,
            clip_iterations=self.st.clip_iters,
            clipped=self.st.clipped,
            rejected_messages=self.rejected,
            agreed=tuple(sorted(self.st.agreed_all)),
            **decided,
        )
        self._audit("step", result)
        self._outbox.append(result)
        # Advance to the next step (membership, shared randomness, validator roles).
        self.phase = Phase.IDLE
        self.st.ag = None
        if self.id in out.next_members and not out.partitioned:
            self.members = out.next_members
        self.r_prev = out.r
        self.validators = out.next_validators
        self.observers = frozenset(out.joined)
        self.probation = out.probation
        self.phase_timeout = out.next_phase_timeout
        self.step += 1


def _item_ref(s: Signed) -> tuple[int, bytes, int]:
    """(kind, origin, index) of an agreement item: its slot, or (kind, sender, 0) for an ACCUSE-phase item."""
    m = s.msg
    if m.kind in KIND_PHASE:
        return (int(m.kind), m.sender, m.slot()[2])
    return (int(m.kind), m.sender, 0)
