"""The decision of a step: a pure function of (the step's agreed items, the agreed state it started from).

`decide` is what every honest peer computes when the ACCUSE agreement closes, and what `btard audit` recomputes
offline from a log; `docs/agreement.md` argues why all honest peers feed it the same inputs. The helpers above it
(`assign_aggregators`, `shared_random`, `choose_validators`, ...) are the same pure functions the state machine
uses during the step, so the step's actions and its decision cannot drift apart.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from btard.crypto import digest, short_id
from btard.protocol import checks
from btard.protocol.config import TIMEOUT_FACTOR, TIMEOUT_GROWTH, ProtocolConfig
from btard.protocol.events import BanReason, Verdict
from btard.protocol.evidence import (
    PART_REASONS,
    VOID_REASONS,
    StepView,
    about_grad_part,
    decoded_evidence,
    mprng_digest,
    resolve,
    shape_problem,
)
from btard.protocol.messages import Accuse, Kind, Signed, decode

Slot = tuple  # (kind, sender, index)


# ---------------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Prior:
    """The agreed state a step starts from (the previous step's outcome)."""

    step: int
    members: tuple[bytes, ...]
    validators: Mapping[bytes, bytes]
    observers: frozenset[bytes]
    probation: Mapping[bytes, int]
    banned: frozenset[bytes]
    r_prev: bytes
    phase_timeout: float

    def on_probation(self, p: bytes) -> bool:
        return self.probation.get(p, -1) >= self.step

    @functools.cached_property
    def contributors(self) -> tuple[bytes, ...]:
        return tuple(p for p in self.members if p not in self.validators and p not in self.observers)

    @functools.cached_property
    def aggregating(self) -> tuple[bytes, ...]:
        return tuple(p for p in self.contributors if not self.on_probation(p))


@dataclass(frozen=True)
class Agreed:
    """A step's agreed items: content slots with exactly one agreed version, slots with two (equivocation),
    and the ACCUSE phase's accusations and public items (JOIN, LEAVE, public re-send requests and parts)."""

    slots: Mapping[Slot, Signed]
    equivocated: Mapping[Slot, tuple[Signed, Signed]]
    accusations: Mapping[bytes, Signed]
    public: Mapping[bytes, Signed]


Validation = Callable[[Accuse, list[Signed]], bool | None]
"""Decides a validator's accusation from its decoded evidence (needs the model): True proven, False not, None
cannot be decided (no verdict)."""


# ---------------------------------------------------------------------------------------------------- helpers
def bounds_of(cfg: ProtocolConfig, prior: Prior) -> list[tuple[int, int]]:
    return checks.part_bounds(cfg.dim, max(len(prior.aggregating), 1))


def committed_of(prior: Prior, slots: Mapping[Slot, Signed]) -> tuple[bytes, ...]:
    return tuple(p for p in prior.contributors if (Kind.GRAD_COMMIT, p, 0) in slots)


def assign_aggregators(order: Sequence[bytes], committed: Sequence[bytes]) -> dict[int, bytes]:
    """Part j goes to order[j]; a part whose peer did not commit goes to the next committed peer in the order."""
    present = set(committed)
    out: dict[int, bytes] = {}
    if not present:
        return out
    for j in range(len(order)):
        for k in range(len(order)):
            cand = order[(j + k) % len(order)]
            if cand in present:
                out[j] = cand
                break
    return out


def live_of(prior: Prior, committed: Sequence[bytes]) -> tuple[bytes, ...]:
    """Members minus contributors that never committed."""
    silent = set(prior.contributors) - set(committed)
    return tuple(p for p in prior.members if p not in silent)


def shared_random(
    run_id: bytes, step: int, r_prev: bytes, members: Sequence[bytes], slots: Mapping[Slot, Signed]
) -> bytes:
    """r^t = H(r^{t−1}, every member's valid reveal in member order), from the step's agreed MPRNG slots."""
    reveals = []
    for p in members:
        c = slots.get((Kind.MPRNG_COMMIT, p, 0))
        r = slots.get((Kind.MPRNG_REVEAL, p, 0))
        if c and r and mprng_digest(run_id, step, p, r.msg.secret) == c.msg.commitment:
            reveals.append(p + r.msg.secret)
    return digest("mprng-r", run_id, step, r_prev, b"".join(reveals))


def load_aggregate_part(
    cfg: ProtocolConfig,
    step: int,
    slots: Mapping[Slot, Signed],
    aggregator: bytes | None,
    j: int,
    length: int,
) -> torch.Tensor | None:
    """ĝ[j] as agreed, if its commit and part match, it has the right length and is finite."""
    p = slots.get((Kind.AGG_PART, aggregator, j))
    c = slots.get((Kind.AGG_COMMIT, aggregator, j))
    if p is None or c is None or len(p.msg.data) // 4 != length:
        return None
    if p.msg.data_digest("agg-part", cfg.run_id, step, aggregator, j) != c.msg.agg_hash:
        return None
    return p.msg.tensor() if p.msg.all_finite else None


def publicly_pulled(public: Mapping[bytes, Signed], aggregator: bytes | None, j: int) -> set[bytes]:
    """Senders part j's aggregator asked publicly to re-send part j."""
    return {
        s.msg.origin
        for s in public.values()
        if s.msg.kind == Kind.PULL and s.msg.sender == aggregator and s.msg.index == j and s.msg.public
    }


def resent(public: Mapping[bytes, Signed], p: bytes, j: int) -> bool:
    """Whether `p` re-sent part j publicly (an agreed public item)."""
    return any(
        s.msg.kind == Kind.GRAD_PART and s.msg.sender == p and s.msg.part == j for s in public.values()
    )


def next_timeout(cfg: ProtocolConfig, current: float, slots: Mapping[Slot, Signed]) -> float:
    """max(T, TIMEOUT_FACTOR × the median reported phase time), growing at most TIMEOUT_GROWTH× per step."""
    hints = sorted(x.msg.phase_hint_ms for (k, _, _), x in slots.items() if k == Kind.MPRNG_COMMIT)
    t = cfg.phase_timeout
    if hints:
        t = min(max(t, TIMEOUT_FACTOR * float(np.median(hints)) / 1000.0), TIMEOUT_GROWTH * current)
    return t


def admitted(
    cfg: ProtocolConfig,
    public: Mapping[bytes, Signed],
    members: Sequence[bytes],
    banned: set[bytes],
    r: bytes,
) -> tuple[bytes, ...]:
    """Joiners admitted at the end of the step: senders of agreed JOINs, at most `max_joins_per_step`, in an
    order drawn from r."""
    cands = {x.msg.sender for x in public.values() if x.msg.kind == Kind.JOIN}
    cands = {p for p in cands if p not in members and p not in banned}
    ranked = sorted(cands, key=lambda p: digest("join", r, p))
    return tuple(sorted(ranked[: cfg.max_joins_per_step]))


def choose_validators(
    members: Sequence[bytes],
    candidates: Sequence[bytes],
    r: bytes,
    m: int,
    *,
    priority: Sequence[bytes] = (),
) -> dict[bytes, bytes]:
    """m validators among `members` and a distinct target (≠ itself) for each among `candidates`, from r.

    Peers in `priority` (on probation) are each targeted by one validator before any random target is drawn,
    and there is at least one validator while any is on probation. At most ⌊(len(members) − 1)/2⌋
    validators, so contributors stay the majority of the next step.
    """
    return dict(_choose_validators(tuple(members), tuple(candidates), r, m, tuple(priority)))


@functools.lru_cache(maxsize=64)  # a pure function of public values; every peer of a simulation asks it
def _choose_validators(
    members: tuple[bytes, ...],
    candidates: tuple[bytes, ...],
    r: bytes,
    m: int,
    priority: tuple[bytes, ...],
) -> tuple[tuple[bytes, bytes], ...]:
    priority = [c for c in priority if c in candidates]
    m = min(max(m, 1 if priority else 0), (len(members) - 1) // 2)
    if m <= 0 or not candidates:
        return ()
    ranked = sorted(members, key=lambda p: digest("validator", r, p))
    out: dict[bytes, bytes] = {}
    for c in sorted(priority, key=lambda c: digest("probation-target", r, c))[:m]:
        v = next((v for v in ranked if v not in out and v != c), None)
        if v is not None:
            out[v] = c
    for v in ranked:
        if len(out) >= m:
            break
        if v in out:
            continue
        targets = sorted((c for c in candidates if c != v), key=lambda c: digest("target", r, v, c))
        if targets:
            out[v] = targets[0]
    return tuple(out.items())


# ---------------------------------------------------------------------------------------------------- the step
class StepFacts:
    """What follows from (config, prior, agreed items) alone: parts, aggregators, r, the published parts and
    the evidence view of the step. Memoized, pure."""

    def __init__(
        self,
        cfg: ProtocolConfig,
        prior: Prior,
        agreed: Agreed,
        *,
        zs: Callable[[bytes, int, int], torch.Tensor] | None = None,
        agg_cache: dict[int, torch.Tensor | None] | None = None,
    ) -> None:
        self.cfg, self.prior, self.agreed = cfg, prior, agreed
        self.bounds = bounds_of(cfg, prior)
        self.order = checks.part_order(prior.aggregating, prior.r_prev)
        self.committed = committed_of(prior, agreed.slots)
        self.aggregators = assign_aggregators(self.order, self.committed)
        self.live = live_of(prior, self.committed)
        self.r = shared_random(cfg.run_id, prior.step, prior.r_prev, prior.members, agreed.slots)
        self._zs = zs or (lambda r, j, n: checks.projection_vectors(r, j, n, cfg.num_projections))
        # ĝ[j] by part, loaded once; a peer passes the parts it already loaded from the same agreed slots.
        self._agg: dict[int, torch.Tensor | None] = {} if agg_cache is None else agg_cache

    def z(self, j: int) -> torch.Tensor:
        a, b = self.bounds[j]
        return self._zs(self.r, j, b - a)

    def agg_part(self, j: int) -> torch.Tensor | None:
        if j not in self._agg:
            a, b = self.bounds[j]
            self._agg[j] = load_aggregate_part(
                self.cfg, self.prior.step, self.agreed.slots, self.aggregators.get(j), j, b - a
            )
        return self._agg[j]

    def view(self) -> StepView:
        commits = {p: x for (k, p, _), x in self.agreed.slots.items() if k == Kind.GRAD_COMMIT}
        return StepView(self.prior.step, self.bounds, commits, self.agg_part, self.z)

    def declared(self, j: int) -> tuple[bytes, ...]:
        c = self.agreed.slots.get((Kind.AGG_COMMIT, self.aggregators.get(j, b""), j))
        return c.msg.included if c is not None else ()


@dataclass(frozen=True)
class Outcome:
    """Everything a step decides (identical at every honest peer)."""

    r: bytes
    aggregate: torch.Tensor
    verdicts: tuple[Verdict, ...]
    excluded: tuple[bytes, ...]
    next_members: tuple[bytes, ...]
    next_validators: dict[bytes, bytes]
    failed_parts: tuple[int, ...]
    missing_parts: tuple[int, ...]
    unapplied_parts: tuple[int, ...]
    joined: tuple[bytes, ...]
    left: tuple[bytes, ...]
    next_phase_timeout: float
    probation: dict[bytes, int]
    partitioned: bool
    # the valid agreed parts ĝ[j] (a validator of the next step needs them)
    published: dict[int, torch.Tensor] = field(default_factory=dict)


def proven_bad_senders(
    cfg: ProtocolConfig, facts: StepFacts, accusations: Mapping[bytes, Signed], j: int, judge
) -> set[bytes]:
    """Senders part j's aggregator proved bad for part j (a bad signed part as evidence)."""
    agg = facts.aggregators.get(j)
    bad = set()
    for s in accusations.values():
        a: Accuse = s.msg
        if (
            a.sender == agg
            and a.part == j
            and a.about_step == facts.prior.step
            and a.reason in PART_REASONS
            and about_grad_part(a, cfg.limits)
            and judge(s) == a.accused
        ):
            bad.add(a.accused)
    return bad


def void_parts(cfg: ProtocolConfig, facts: StepFacts, accusations: Mapping[bytes, Signed], judge) -> set[int]:
    """Parts whose aggregator is proven to have published a bad aggregate: missing for everyone."""
    void = set()
    for s in accusations.values():
        a: Accuse = s.msg
        if a.reason not in VOID_REASONS or facts.aggregators.get(a.part) != a.accused:
            continue
        ev = decoded_evidence(a, cfg)
        kinds = {e.msg.kind for e in ev} if ev is not None else {Kind.ACCUSE}
        if kinds <= {Kind.AGG_COMMIT, Kind.AGG_PART} and judge(s) == a.accused:
            void.add(a.part)
    return void


class _Verdicts:
    """The step's bans, first one per peer (in a fixed order of reasons)."""

    def __init__(self, step: int, members: Sequence[bytes], targets: Sequence[bytes] = ()) -> None:
        # Members, and the targets of this step's validators: a peer that left after the step it is validated
        # for is banned all the same (it cannot come back), though it is no longer a member.
        self.step, self.members = step, set(members) | set(targets)
        self.by_peer: dict[bytes, Verdict] = {}

    def ban(
        self, who, code: BanReason, reason: str, accuser: bytes | None, evidence: tuple[bytes, ...]
    ) -> None:
        if who is not None and who not in self.by_peer and who in self.members:
            self.by_peer[who] = Verdict(self.step, who, code, reason, accuser, evidence)


def _judge_accusations(facts: StepFacts, judge, void: set[int], out: _Verdicts) -> dict:
    """Verdicts from two agreed versions of a slot and from the agreed accusations (in digest order); returns
    the (part, peer) -> (norm, projections) recomputed from the signed part of every proven wrong report."""
    cfg, agreed, step = facts.cfg, facts.agreed, facts.prior.step
    for slot, (v1, v2) in sorted(agreed.equivocated.items(), key=lambda kv: kv[1][0].msg_digest):
        out.ban(slot[1], BanReason.EQUIVOCATION, "equivocation", None, (v1.msg_digest, v2.msg_digest))
    corrected: dict[tuple[int, bytes], tuple[float, np.ndarray]] = {}
    for d in sorted(agreed.accusations):
        s = agreed.accusations[d]
        a: Accuse = s.msg
        wrong_projection = a.reason.name == "WRONG_PROJECTION" and a.about_step == step
        if wrong_projection and a.part in void:
            continue  # projections against a void aggregate mean nothing: no verdict
        who = judge(s)
        if who is None:
            continue
        if who == a.accused:
            code = BanReason.of(a.reason)
            out.ban(who, code, code.value, a.sender, (d,))
            if wrong_projection:
                part = decode(a.evidence[0], cfg.limits).msg
                corrected[(a.part, a.accused)] = checks.project(
                    part.tensor(), facts.agg_part(a.part), facts.z(a.part)
                )
        else:
            detail = f"false accusation ({a.reason.name.lower()}) against {short_id(a.accused)}"
            out.ban(who, BanReason.FALSE_ACCUSATION, detail, None, (d,))
    return corrected


@dataclass
class _Parts:
    failed: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    unapplied: list[int] = field(default_factory=list)
    published: dict[int, torch.Tensor] = field(default_factory=dict)
    applied: dict[int, torch.Tensor] = field(default_factory=dict)


def _check_part(facts: StepFacts, j: int, agg, corrected: dict, judge, check, parts: _Parts, out: _Verdicts):
    """Part j's declared inputs, then its fixed-point and scale checks: applied, unapplied or failed."""
    cfg, agreed, prior = facts.cfg, facts.agreed, facts.prior
    aggregator, nparts = facts.aggregators.get(j), len(facts.bounds)
    senders = list(facts.declared(j))
    # Any committed contributor's part may be included (a proven-bad one is clipped like any other and its
    # reports are checked); every one not proven bad for part j by the aggregator and not asked for publicly
    # must be: omissions are what an aggregator could use to pick its inputs.
    allowed = {p for p in facts.committed if not prior.on_probation(p)}
    bad = proven_bad_senders(cfg, facts, agreed.accusations, j, judge)
    required = (allowed - bad) - publicly_pulled(agreed.public, aggregator, j)
    if not set(senders) <= allowed or not required <= set(senders):
        parts.failed.append(j)
        odd = sorted(short_id(p) for p in (set(senders) - allowed) | (required - set(senders)))
        detail = f"aggregate of part {j} declares the wrong inputs ({', '.join(odd)})"
        out.ban(aggregator, BanReason.WRONG_INPUTS, detail, None, ())
        return
    projs = [agreed.slots.get((Kind.PROJ, p, 0)) for p in senders]
    if not senders or any(pr is None or shape_problem(pr.msg, nparts, cfg.num_projections) for pr in projs):
        parts.unapplied.append(j)  # a part that cannot be checked is never applied (its silent reporters go)
        return
    norms = np.array([pr.msg.norms[j] for pr in projs])
    s_vals = np.stack([pr.msg.projections[j] for pr in projs])
    trusted = np.zeros(len(senders), dtype=bool)
    for i, p in enumerate(senders):
        if (j, p) in corrected:
            norms[i], s_vals[i] = corrected[(j, p)]
            trusted[i] = True
    res = check.fixed_point_check(
        norms,
        s_vals,
        tau=cfg.tau,
        lam=cfg.lam,
        eps_rel=cfg.eps_rel,
        plausibility=cfg.plausibility,
        trusted=trusted,
        ref_norm=float(agg.double().norm()),  # the adaptive τ's floor, as the aggregator applied it
    )
    if res.ok and (
        len(senders) < checks.SCALE_MIN_REPORTS or check.scale_ratio(norms, s_vals) <= checks.SCALE_LIMIT
    ):
        parts.applied[j] = agg
    elif res.ok:
        parts.unapplied.append(j)
    else:
        parts.failed.append(j)
        detail = (
            f"aggregate of part {j} fails the projection check ({res.statistic:.3g} > {res.tolerance:.3g})"
        )
        out.ban(aggregator, BanReason.FAILED_CHECK, detail, None, ())


def _excluded(facts: StepFacts, missing: Sequence[int], banned: Mapping[bytes, Verdict]) -> set[bytes]:
    """Members whose agreed messages are missing (silent or crashed), not banned."""
    slots, public, prior = facts.agreed.slots, facts.agreed.public, facts.prior
    excluded = set(prior.contributors) - set(facts.committed)
    excluded |= {facts.aggregators[j] for j in missing if j in facts.aggregators}
    excluded |= {p for p in facts.live if (Kind.MPRNG_COMMIT, p, 0) not in slots}
    excluded |= {p for p in facts.live if (Kind.MPRNG_REVEAL, p, 0) not in slots}
    excluded |= {p for p in facts.committed if (Kind.PROJ, p, 0) not in slots}
    # Asked publicly, left out of the agreed aggregate although it had to be aggregated, never re-sent: silent.
    # The request alone proves nothing (it may reach the owner only inside the ACCUSE agreement, too late for
    # an answer to be agreed); the agreed AGG_COMMIT reaches every honest owner before its ACCUSE manifest, and
    # an honest owner it leaves out re-sends at once (`BtardPeer._resend_omitted_parts`).
    owners = {p for p in facts.committed if not prior.on_probation(p)}
    for j in range(len(facts.bounds)):
        if j not in missing:
            pulled = publicly_pulled(public, facts.aggregators.get(j), j)
            owed = (pulled & owners) - set(facts.declared(j))
            excluded |= {p for p in owed if not resent(public, p, j)}
    return excluded - set(banned)


@dataclass(frozen=True)
class _Next:
    members: tuple[bytes, ...]
    validators: dict[bytes, bytes]
    joined: tuple[bytes, ...]
    left: tuple[bytes, ...]
    probation: dict[bytes, int]
    partitioned: bool


def _membership(facts: StepFacts, verdicts: Mapping[bytes, Verdict], excluded: set[bytes]) -> _Next:
    """The next step's members, joiners, leavers, probation and validators."""
    cfg, prior, public = facts.cfg, facts.prior, facts.agreed.public
    step, members = prior.step, prior.members
    survivors = tuple(p for p in members if p not in verdicts and p not in excluded)
    # An honest majority never loses half of the members in one step; a peer that sees it happen is the one cut
    # off (its view is the minority's), so it must stop rather than train on alone. Joiners in their observer
    # step do not count: admitted outsiders that stay silent must not make the honest peers stop.
    established = [p for p in members if p not in prior.observers]
    partitioned = 2 * sum(p not in prior.observers for p in survivors) <= len(established)
    banned = set(prior.banned) | set(verdicts)
    joined = admitted(cfg, public, members, banned, facts.r) if not partitioned else ()
    leavers = {x.msg.sender for x in public.values() if x.msg.kind == Kind.LEAVE}
    left = tuple(sorted(leavers & set(survivors)))
    next_members = tuple(sorted(p for p in survivors + joined if p not in left))
    probation = {p: s for p, s in prior.probation.items() if s > step and p in next_members}
    for p in joined:
        probation[p] = step + 1 + cfg.probation_steps  # observe step t+1, then contribute
    pool = [p for p in next_members if p not in joined and probation.get(p, -1) <= step]
    validators = choose_validators(
        pool,
        [p for p in facts.committed if p in next_members or p in left],  # leaving exempts nobody
        facts.r,
        cfg.validators,
        priority=[p for p in facts.committed if prior.on_probation(p)],
    )
    return _Next(next_members, validators, joined, left, probation, partitioned)


def decide(facts: StepFacts, *, previous: StepView | None, validation: Validation, check=checks) -> Outcome:
    """The step's outcome from its agreed items and prior state (see the module docstring)."""
    cfg, prior, agreed = facts.cfg, facts.prior, facts.agreed
    step, members, current = prior.step, prior.members, facts.view()

    def views(t: int) -> StepView | None:
        return current if t == step else previous if previous is not None and previous.step == t else None

    @functools.cache
    def judge(s: Signed) -> bytes | None:
        return resolve(cfg, s, step, views, validation)

    out = _Verdicts(step, members, tuple(prior.validators.values()))
    void = void_parts(cfg, facts, agreed.accusations, judge)
    corrected = _judge_accusations(facts, judge, void, out)
    parts = _Parts()
    for j in range(len(facts.bounds)):
        agg = None if j in void else facts.agg_part(j)
        if agg is None:
            parts.missing.append(j)
            continue
        parts.published[j] = agg
        _check_part(facts, j, agg, corrected, judge, check, parts, out)
    dtype = torch.get_default_dtype()
    aggregate = torch.cat(  # a new tensor (never a view of a part)
        [parts.applied.get(j, torch.zeros(b - a, dtype=dtype)) for j, (a, b) in enumerate(facts.bounds)]
    ).to(dtype)
    verdicts = out.by_peer
    excluded = _excluded(facts, parts.missing, verdicts)
    members_next = _membership(facts, verdicts, excluded)
    return Outcome(
        r=facts.r,
        aggregate=aggregate,
        verdicts=tuple(verdicts[k] for k in sorted(verdicts)),
        excluded=tuple(sorted(excluded)),
        next_members=members_next.members,
        next_validators=members_next.validators,
        failed_parts=tuple(parts.failed),
        missing_parts=tuple(parts.missing),
        unapplied_parts=tuple(parts.unapplied),
        joined=members_next.joined,
        left=members_next.left,
        next_phase_timeout=next_timeout(cfg, prior.phase_timeout, agreed.slots),
        probation=members_next.probation,
        partitioned=members_next.partitioned,
        published=parts.published,
    )
