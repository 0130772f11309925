"""An adversarial scheduler for the sans-IO peers: the agreement property tried as an attacker would.

One *schedule* is a seeded run of n `BtardPeer`s for a few steps. The last b of them (b < n/2) are Byzantine:
they are plain `BtardPeer`s too (so everything they send is validly signed and well formed), but an
*adversary* stands between them and the honest peers and controls their traffic completely:

- every message a Byzantine peer sends is routed, per honest destination, by the adversary: delivered at once,
  dropped, or held and released at any later time, e.g. just before, at or just after a deadline of an honest
  peer (`BtardPeer.next_deadline`) or when an honest peer enters a phase;
- it can inject any message it can sign with a Byzantine identity (or an outsider identity, for JOIN):
  second versions of content and round messages, duplicates and replays of anything it has seen, messages for
  other steps, accusations with genuine or bogus evidence, DIGEST and PULL messages listing arbitrary items;
- it is omniscient: it sees every honest message and reads every honest peer's state.

Honest-to-honest messages are never dropped; each is delayed by a seeded amount in [0, 0.25·T) (T the honest
peers' phase timeout), which is inside the synchrony bound the protocol assumes. Everything is a function of the
`Schedule`: the same schedule gives the same run, bit for bit (decisions and delays are drawn from keyed hashes
of the seed, so disabling one adversary action to shrink a counterexample changes as little else as possible).

After every step the honest peers' `StepResult`s are compared (`check_step`): verdicts (banned ids and
reasons), exclusions, next members, next validators, next timeout, r, the aggregate, joined and left must be
identical, and no honest peer may be banned. An honest peer that is excluded is reported separately (a weaker
failure) and no longer driven; an honest peer that does not finish a step or raises is a failure too.

Usage::

    outcome = run_schedule(Schedule(seed=3, strategy="equivocate", n=5, byzantine=2))
    if outcome.failed:
        print(minimize(outcome).describe())   # seed, strategy, the failure, the adversary's actions

`STRATEGIES` names the strategy families (each a list of `Tactic`s); `Adversary` subclasses or new tactics plug
into `run_schedule(schedule, adversary=...)`.

One file (over 1,000 lines) because the driver loop, the routing of Byzantine traffic, the tactics and the
property check share one schedule context and its keyed randomness; splitting them would only move that
context into module-level state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from btard.crypto import Identity, short_id
from btard.protocol.checks import CheckCache, ProjectionCache
from btard.protocol.messages import (
    Accuse,
    AggCommit,
    Digest,
    GradCommit,
    Join,
    Kind,
    Leave,
    Message,
    MprngCommit,
    MprngReveal,
    Proj,
    Pull,
    Reason,
    Signed,
    _TensorMessage,
    decode,
    encode,
)
from btard.protocol.messages import DecodeCache as _DecodeCache
from btard.protocol.peer import BtardPeer, PhaseEntered, ProtocolConfig, Send, StepResult
from btard.protocol.state import BARRIER_KINDS, KIND_PHASE, Phase

RUN_ID = b"adversary-run-00"
EPS = 1e-6  # "just before" / "just after" a time, in units of T
HONEST_DELAY = 0.25  # honest-to-honest delays are drawn in [0, HONEST_DELAY · T)
MAX_EVENTS_PER_STEP = 200_000
SERIOUS = ("split", "honest-ban", "crash", "stuck", "partitioned")


# ---------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Schedule:
    """Everything a run depends on. `disabled`: adversary action keys to skip (used by `minimize`)."""

    seed: int
    strategy: str = "mixed"
    n: int = 5
    byzantine: int = 2
    steps: int = 2
    dim: int = 64
    phase_timeout: float = 1.0
    validators: int = 1
    disabled: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not 0 <= 2 * self.byzantine < self.n:
            raise ValueError("need 0 ≤ b < n/2")


@dataclass(frozen=True)
class Action:
    """One thing the adversary did beyond relaying a Byzantine message at once."""

    time: float
    step: int
    key: str  # stable name of the decision (disable it with Schedule.disabled)
    what: str


@dataclass(frozen=True)
class Failure:
    """A violation found after a step. kind: split | honest-ban | honest-exclusion | partitioned | stuck | crash."""

    step: int
    kind: str
    detail: str


@dataclass
class Outcome:
    schedule: Schedule
    names: dict[bytes, str]
    failures: list[Failure] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    results: list[dict[bytes, StepResult]] = field(
        default_factory=list
    )  # per step: the honest peers' results
    steps_done: int = 0
    seconds: float = 0.0

    def has(self, kind: str) -> bool:
        return any(f.kind == kind for f in self.failures)

    @property
    def failed(self) -> bool:
        """Any violation of the property (honest exclusions are reported but are not violations)."""
        return any(f.kind in SERIOUS for f in self.failures)

    def describe(self, max_actions: int = 40) -> str:
        """A counterexample: how to rerun it, what went wrong, and what the adversary did."""
        s = self.schedule
        lines = [
            f"schedule: seed={s.seed} strategy={s.strategy} n={s.n} b={s.byzantine} steps={s.steps} "
            f"dim={s.dim} T={s.phase_timeout} validators={s.validators}"
            + (f" disabled={len(s.disabled)} actions" if s.disabled else ""),
            "peers: "
            + ", ".join(f"{v}={short_id(k)}" for k, v in sorted(self.names.items(), key=lambda kv: kv[1])),
        ]
        lines += [f"  step {f.step}: {f.kind}: {f.detail}" for f in self.failures] or ["  no failure"]
        lines.append(f"adversary actions ({len(self.actions)}):")
        for a in self.actions[:max_actions]:
            lines.append(f"  t={a.time:.6f} step {a.step}: {a.what}")
        if len(self.actions) > max_actions:
            lines.append(f"  ... {len(self.actions) - max_actions} more")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the property
_COMPARED = (
    "verdicts",
    "excluded",
    "next_members",
    "next_validators",
    "next_phase_timeout",
    "r",
    "aggregate",
    "joined",
    "left",
)


def _view(res: StepResult, what: str) -> object:
    if what == "verdicts":
        return tuple((v.banned, v.reason) for v in res.verdicts)
    if what == "aggregate":
        return res.aggregate
    if what == "next_validators":
        return tuple(sorted(res.next_validators.items()))
    return getattr(res, what)


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    return a == b


def _show(x: object, names: dict[bytes, str]) -> str:
    if isinstance(x, bytes):
        return names.get(x, x.hex()[:8])
    if isinstance(x, tuple):
        return "(" + ", ".join(_show(y, names) for y in x) + ")"
    if isinstance(x, torch.Tensor):
        return f"tensor(sum={float(x.double().sum()):.6g})"
    return repr(x)


def check_step(step: int, results: dict[bytes, StepResult], names: dict[bytes, str]) -> list[Failure]:
    """The property over the honest peers' results of one step (all of `results` are honest)."""
    out: list[Failure] = []
    if not results:
        return out
    for what in _COMPARED:
        groups: list[tuple[object, list[bytes]]] = []
        for pid, res in results.items():
            v = _view(res, what)
            for g in groups:
                if _same(g[0], v):
                    g[1].append(pid)
                    break
            else:
                groups.append((v, [pid]))
        if len(groups) > 1:
            detail = " vs ".join(
                "{" + ",".join(names[p] for p in ps) + "}: " + _show(v, names) for v, ps in groups
            )
            out.append(Failure(step, "split", f"{what} differ: {detail}"))
    honest = set(results)
    for pid, res in results.items():
        for v in res.verdicts:
            if v.banned in honest:
                out.append(Failure(step, "honest-ban", f"{names[pid]} bans {names[v.banned]}: {v.reason}"))
        if res.partitioned:
            out.append(Failure(step, "partitioned", f"{names[pid]} considers itself cut off"))
    excl = sorted({p for res in results.values() for p in res.excluded if p in honest})
    if excl:
        out.append(Failure(step, "honest-exclusion", "excluded: " + ", ".join(names[p] for p in excl)))
    return out


# ---------------------------------------------------------------------------------------------- helpers
def keyed_random(seed: int, *key: object) -> random.Random:
    """A generator determined by (seed, key) only: the same decision draws the same numbers in every rerun."""
    h = hashlib.blake2b(repr((seed, key)).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(h, "little"))


def describe_message(s: Signed, names: dict[bytes, str]) -> str:
    """A short human description of a signed message (kind, sender, slot, a digest prefix)."""
    m, who = s.msg, names.get(s.msg.sender, short_id(s.msg.sender))
    tag = s.msg_digest.hex()[:6]
    if m.kind == Kind.DIGEST:
        phase = Phase(m.phase).name if m.phase in {int(p) for p in Phase} else m.phase
        return f"DIGEST({who} s{m.step} {phase} r{m.round}, {len(m.entries)} items)#{tag}"
    if m.kind == Kind.ACCUSE:
        return (
            f"ACCUSE({who} s{m.step} → {names.get(m.accused, short_id(m.accused))}, {m.reason.name}, "
            f"part {m.part}, about {m.about_step}, {len(m.evidence)} evidence)#{tag}"
        )
    if m.kind == Kind.PULL:
        origin = names.get(m.origin, m.origin.hex()[:6])
        kind = Kind(m.want_kind).name if m.want_kind in {int(k) for k in Kind} else m.want_kind
        return f"PULL({who} s{m.step} {kind} of {origin}[{m.index}]{' public' if m.public else ''})#{tag}"
    idx = getattr(m, "part", None)
    return f"{m.kind.name}({who} s{m.step}{'' if idx is None else f' part {idx}'})#{tag}"


def second_version(msg: Message, rng: random.Random) -> Message | None:
    """Another message for the same slot as `msg` (an equivocation), or None for kinds without one."""
    if isinstance(msg, _TensorMessage):
        x = np.frombuffer(msg.data, dtype="<f4").copy()
        if x.size:
            x[rng.randrange(x.size)] += 1.0 + rng.random()
        else:
            x = np.zeros(1, dtype="<f4")  # a wrong shape is a different version too
        return dataclasses.replace(msg, data=x.astype("<f4").tobytes())
    if isinstance(msg, GradCommit):
        hashes = list(msg.part_hashes)
        hashes[rng.randrange(len(hashes))] = rng.randbytes(32)
        return dataclasses.replace(msg, part_hashes=tuple(hashes))
    if isinstance(msg, AggCommit):
        if msg.included and rng.random() < 0.5:
            return dataclasses.replace(msg, included=msg.included[:-1])
        return dataclasses.replace(msg, agg_hash=rng.randbytes(32))
    if isinstance(msg, MprngCommit):
        if rng.random() < 0.5:
            return dataclasses.replace(msg, phase_hint_ms=msg.phase_hint_ms + rng.randrange(1, 100_000))
        return dataclasses.replace(msg, commitment=rng.randbytes(32))
    if isinstance(msg, MprngReveal):
        return dataclasses.replace(msg, secret=rng.randbytes(32))
    if isinstance(msg, Proj):
        norms = msg.norms.copy() + rng.random() + 0.01
        return Proj.of(msg.run_id, msg.step, msg.sender, norms, msg.projections.copy())
    if isinstance(msg, Digest):
        entries = list(msg.entries)
        if entries and rng.random() < 0.6:
            entries.pop(rng.randrange(len(entries)))
        else:
            entries.append((int(Kind.ACCUSE), msg.sender, 0, rng.randbytes(32)))
        return dataclasses.replace(msg, entries=tuple(entries))
    return None


# ---------------------------------------------------------------------------------------------- the driver
@dataclass(order=True)
class _Event:
    time: float
    seq: int
    dest: bytes = field(compare=False)
    raw: bytes | None = field(compare=False)
    call: Callable[[], None] | None = field(compare=False, default=None)


class Run:
    """One schedule being run. Strategies act through this object (their context): its public methods are the
    adversary's powers; honest peers are driven only by the loop in `run_step`."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = s = schedule
        base = hashlib.blake2b(f"adversary-ids-{s.seed}".encode(), digest_size=16).digest()
        idents = [Identity.from_seed(base + i.to_bytes(4, "little")) for i in range(s.n)]
        rng = keyed_random(s.seed, "roles")
        byz_idx = set(rng.sample(range(s.n), s.byzantine))  # roles depend on ids: vary who is Byzantine
        self.cfg = ProtocolConfig(
            run_id=RUN_ID, dim=s.dim, validators=s.validators, phase_timeout=s.phase_timeout
        )
        ids = [i.peer_id for i in idents]
        caches = (ProjectionCache(), _DecodeCache(), CheckCache())
        self.identities: dict[bytes, Identity] = {i.peer_id: i for i in idents}
        self.peers: dict[bytes, BtardPeer] = {
            i.peer_id: BtardPeer(
                i,
                self.cfg,
                ids,
                oracle=self.gradient,
                secret_source=_secrets(s.seed, i.peer_id),
                projection_cache=caches[0],
                decode_cache=caches[1],
                check_cache=caches[2],
            )
            for i in idents
        }
        self.byzantine: list[bytes] = [ids[i] for i in sorted(byz_idx)]
        self.honest: list[bytes] = [p for p in ids if p not in self.byzantine]
        self.names: dict[bytes, str] = {}
        for k, p in enumerate(self.honest):
            self.names[p] = f"h{k}"
        for k, p in enumerate(self.byzantine):
            self.names[p] = f"b{k}"
        self.outsiders: list[Identity] = []
        self.forged: set[bytes] = set()  # digests of the messages the adversary signed itself
        self.now = 0.0
        self.step = 0
        self.step_start = 0.0
        self.actions: list[Action] = []
        self._queue: list[_Event] = []
        self._seq = 0
        self._active_byz: set[bytes] = set()
        self._seen_deadline: dict[bytes, float | None] = {}
        self._waiting_phase: dict[tuple[bytes, int], list[Callable[[], None]]] = defaultdict(list)
        self.adversary: Adversary = Adversary(self, [])

    # ------------------------------------------------------------------ what the adversary may use
    @property
    def T(self) -> float:
        return min(self.peers[p].phase_timeout for p in self.honest)

    def gradient(self, step: int, pid: bytes) -> torch.Tensor:
        """The true gradient of `pid` at `step` (the oracle of validation)."""
        seed = int.from_bytes(hashlib.blake2b(step.to_bytes(8, "little") + pid).digest()[:8], "little")
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.cfg.dim, generator=g) * 0.5 + torch.linspace(-1, 1, self.cfg.dim)

    def rng(self, *key: object) -> random.Random:
        return keyed_random(self.schedule.seed, *key)

    def enabled(self, key: str) -> bool:
        return key not in self.schedule.disabled

    def name(self, pid: bytes) -> str:
        return self.names.get(pid, short_id(pid))

    def outsider(self, i: int) -> Identity:
        """The i-th identity outside the run (the adversary's Sybils: JOINs)."""
        while len(self.outsiders) <= i:
            k = len(self.outsiders)
            ident = Identity.from_seed(f"outsider-{self.schedule.seed}-{k}".encode())
            self.outsiders.append(ident)
            self.names[ident.peer_id] = f"x{k}"
        return self.outsiders[i]

    def sign(self, msg: Message) -> Signed:
        """Sign a message as its (Byzantine or outsider) sender."""
        ident = self.identities.get(msg.sender) or next(
            (o for o in self.outsiders if o.peer_id == msg.sender), None
        )
        if ident is None or msg.sender in self.honest:
            raise ValueError("the adversary signs only with Byzantine or outsider identities")
        s = encode(msg, ident)
        self.forged.add(s.msg_digest)
        return s

    def live_honest(self) -> list[bytes]:
        return [p for p in self.honest if p not in self._retired]

    def deliver(
        self, dests: Iterable[bytes], raw: bytes, at: float | None = None, *, key: str = "", what: str = ""
    ) -> bool:
        """Deliver `raw` to each of `dests` at time `at` (default now; never earlier than now). With `key`,
        the action can be disabled (returns False then) and, with `what`, it is logged."""
        if key and not self.enabled(key):
            return False
        t = self.now if at is None else max(self.now, at)
        dests = tuple(dests)
        for d in dests:
            self._push(t, d, raw)
        if what:
            self.actions.append(
                Action(t, self.step, key, f"{what} → {','.join(self.name(d) for d in dests) or 'nobody'}")
            )
        return True

    def call_at(self, t: float, fn: Callable[[], None]) -> None:
        """Run `fn` at time `t` (a wake-up of the adversary)."""
        self._seq += 1
        heapq.heappush(self._queue, _Event(max(self.now, t), self._seq, b"", None, fn))

    def when_phase(self, pid: bytes, phase: Phase, fn: Callable[[], None]) -> None:
        """Run `fn` when honest peer `pid` enters `phase` of the current step (at once if it already has)."""
        p = self.peers[pid]
        if p.step > self.step or (p.step == self.step and p.phase >= phase):
            fn()
        else:
            self._waiting_phase[(pid, int(phase))].append(fn)

    def log(self, key: str, what: str) -> None:
        self.actions.append(Action(self.now, self.step, key, what))

    # ------------------------------------------------------------------ internals
    def _push(self, t: float, dest: bytes, raw: bytes) -> None:
        self._seq += 1
        heapq.heappush(self._queue, _Event(t, self._seq, dest, raw))

    def _honest_delay(self, src: bytes, dest: bytes, raw: bytes) -> float:
        h = hashlib.blake2b(
            raw, digest_size=8, key=self.schedule.seed.to_bytes(8, "little") + src[:8] + dest[:8]
        )
        u = int.from_bytes(h.digest(), "little") / 2**64
        return u * HONEST_DELAY * self.T * (1 - 1e-9)

    def _flush(self, pid: bytes, results: dict[bytes, StepResult]) -> None:
        for ev in self.peers[pid].events():
            if isinstance(ev, StepResult):
                results[pid] = ev
                if pid in self.honest:
                    self.adversary.on_result(pid)
            elif isinstance(ev, Send):
                if pid in self.byzantine:
                    self._byz_send(pid, ev)
                else:
                    self._honest_send(pid, ev)
            elif isinstance(ev, PhaseEntered) and pid in self.honest:
                self.adversary.on_phase(pid, ev.phase)
                for fn in self._waiting_phase.pop((pid, int(ev.phase)), []):
                    fn()

    def _honest_send(self, src: bytes, ev: Send) -> None:
        for d in ev.dests:
            if d in self.byzantine:
                self._push(self.now, d, ev.raw)  # the adversary is rushing: it gets honest messages at once
            else:
                self._push(self.now + self._honest_delay(src, d, ev.raw), d, ev.raw)
        self.adversary.observe(src, ev.dests, ev.raw)

    def _byz_send(self, src: bytes, ev: Send) -> None:
        try:
            s = decode(ev.raw, self.cfg.limits)
        except Exception:  # a Byzantine peer only ever sends what BtardPeer signs; be safe anyway
            return
        honest_dests = [d for d in ev.dests if d in self.honest]
        for d in ev.dests:
            if d in self.byzantine:
                self._push(self.now, d, ev.raw)
        self.adversary.on_byz_send(src, honest_dests, s)
        for d in honest_dests:
            if not self.adversary.route(src, d, s):
                self._push(self.now, d, ev.raw)

    def _touched(self, pid: bytes, results: dict[bytes, StepResult]) -> None:
        self._flush(pid, results)
        if pid in self.honest and pid not in results:
            d = self.peers[pid].next_deadline
            if d is not None and self._seen_deadline.get(pid) != d:
                self._seen_deadline[pid] = d
                self.adversary.on_deadline(pid, d)

    def _begin(self, results: dict[bytes, StepResult], failures: list[Failure]) -> None:
        params = hashlib.blake2b(f"params-{self.step}".encode()).digest()[:32]
        for pid in self.live_honest():
            p = self.peers[pid]
            g = None if p.is_validator or p.is_observer else self.gradient(p.step, pid)
            try:
                p.begin_step(self.now, params, g)
            except Exception as e:  # noqa: BLE001 - an honest peer raising is a finding
                failures.append(Failure(self.step, "crash", f"{self.name(pid)} begin_step: {e!r}"))
                self._retired.add(pid)
                continue
            self._touched(pid, results)
        self._active_byz = set()
        for pid in self.byzantine:
            p = self.peers[pid]
            if p.phase != Phase.IDLE or p.step != self.step or pid not in p.members:
                continue  # it fell out of step: the adversary still signs with its identity
            g = None if p.is_validator or p.is_observer else self.gradient(p.step, pid)
            try:
                p.begin_step(self.now, params, g)
            except Exception:  # noqa: BLE001 - a confused Byzantine peer just stops
                continue
            self._active_byz.add(pid)
            self._touched(pid, results)

    def run_step(self) -> tuple[dict[bytes, StepResult], list[Failure]]:
        """Drive one step until every live honest peer has its result (or one is stuck)."""
        results: dict[bytes, StepResult] = {}
        failures: list[Failure] = []
        self._waiting_phase.clear()
        self._seen_deadline.clear()
        self.step_start = self.now
        self.adversary.begin_step()
        self._begin(results, failures)
        waiting = lambda: [p for p in self.live_honest() if p not in results]  # noqa: E731
        for _ in range(MAX_EVENTS_PER_STEP):
            if not waiting():
                break
            drivers = [p for p in (*self.live_honest(), *self._active_byz) if p not in results]
            deadlines = [(d, p) for p in drivers if (d := self._deadline(p)) is not None]
            t_dead = min(deadlines)[0] if deadlines else None
            if self._queue and (t_dead is None or self._queue[0].time <= t_dead):
                ev = heapq.heappop(self._queue)
                self.now = max(self.now, ev.time)
                if ev.call is not None:
                    ev.call()
                    continue
                if ev.dest in self._retired or ev.dest not in self.peers:
                    continue
                if ev.dest in self.byzantine and ev.dest not in self._active_byz:
                    continue
                raw = ev.raw
                self._safely(ev.dest, lambda p, raw=raw: p.receive(raw, self.now), results, failures)
            elif t_dead is not None:
                self.now = max(self.now, t_dead)
                for d, p in sorted(deadlines):
                    if d <= self.now:
                        self._safely(p, lambda q: q.tick(self.now), results, failures)
            else:
                break
        for p in waiting():
            failures.append(
                Failure(
                    self.step, "stuck", f"{self.name(p)} did not finish (phase {self.peers[p].phase.name})"
                )
            )
            self._retired.add(p)
        return results, failures

    def _deadline(self, pid: bytes) -> float | None:
        try:
            return self.peers[pid].next_deadline
        except Exception:  # noqa: BLE001
            return None

    def _safely(
        self,
        pid: bytes,
        fn: Callable[[BtardPeer], None],
        results: dict[bytes, StepResult],
        failures: list[Failure],
    ) -> None:
        try:
            fn(self.peers[pid])
        except Exception as e:  # noqa: BLE001
            if pid in self.byzantine:
                self._active_byz.discard(pid)
                return
            failures.append(Failure(self.step, "crash", f"{self.name(pid)} raised {e!r}"))
            self._retired.add(pid)
            return
        self._touched(pid, results)

    _retired: set[bytes]

    def run(self, adversary: Adversary) -> Outcome:
        self._retired = set()
        self.adversary = adversary
        out = Outcome(self.schedule, self.names)
        t0 = time.perf_counter()
        for _ in range(self.schedule.steps):
            results, failures = self.run_step()
            honest_results = {p: r for p, r in results.items() if p in self.honest and p not in self._retired}
            failures += check_step(self.step, honest_results, self.names)
            out.results.append(honest_results)
            out.failures += failures
            out.steps_done += 1
            if any(f.kind in SERIOUS for f in failures):
                break
            for f in honest_results.values():  # excluded honest peers are cut off: stop driving them
                for p in f.excluded:
                    if p in self.honest:
                        self._retired.add(p)
                break
            if len(self.live_honest()) * 2 <= len(self.honest):
                break
            self.step += 1
        out.actions = self.actions
        out.names = dict(self.names)
        out.seconds = time.perf_counter() - t0
        return out


def _secrets(seed: int, pid: bytes) -> Callable[[int], bytes]:
    counter = [0]

    def source(n: int) -> bytes:
        counter[0] += 1
        h = hashlib.blake2b(pid + seed.to_bytes(8, "little") + counter[0].to_bytes(8, "little"))
        return h.digest()[:n]

    return source


# ---------------------------------------------------------------------------------------------- the adversary
class Tactic:
    """One kind of misbehaviour. Every hook is optional; `route` returns True when it took charge of a
    Byzantine message to an honest destination (otherwise it is delivered at once)."""

    name = "tactic"

    def __init__(self, rate: float = 1.0) -> None:
        self.rate = rate  # how often the tactic acts where it could (1: always)

    def bind(self, ctx: Run) -> None:
        self.ctx = ctx

    def begin_step(self) -> None: ...

    def on_byz_send(self, src: bytes, dests: Sequence[bytes], s: Signed) -> None: ...

    def route(self, src: bytes, dest: bytes, s: Signed) -> bool:
        return False

    def observe(self, src: bytes, dests: Sequence[bytes], raw: bytes) -> None: ...

    def on_phase(self, pid: bytes, phase: Phase) -> None: ...

    def on_deadline(self, pid: bytes, deadline: float) -> None: ...

    def on_result(self, pid: bytes) -> None:
        """Honest peer `pid` just closed the step (the others may not have yet)."""

    # helpers shared by the tactics
    def key(self, *parts: object) -> str:
        return ":".join([self.name, f"s{self.ctx.step}", *(str(p) for p in parts)])

    def subset(self, rng: random.Random) -> list[bytes]:
        """A random non-empty subset of the live honest peers (often a single one)."""
        hs = self.ctx.live_honest()
        if rng.random() < 0.4:
            return [rng.choice(hs)]
        out = [h for h in hs if rng.random() < 0.5]
        return out or [rng.choice(hs)]

    def anchor(self, rng: random.Random, dest: bytes) -> tuple[float, str]:
        """A delivery time chosen to hurt: now, shortly, or just before / at / just after `dest`'s next
        deadline (or another honest peer's)."""
        ctx, T = self.ctx, self.ctx.T
        c = rng.random()
        if c < 0.15:
            return ctx.now, "now"
        if c < 0.35:
            dt = rng.random() * HONEST_DELAY * T
            return ctx.now + dt, f"now+{dt:.3f}"
        target = dest if rng.random() < 0.7 else rng.choice(ctx.live_honest())
        d = ctx._deadline(target)
        if d is None:
            dt = rng.random() * T
            return ctx.now + dt, f"now+{dt:.3f}"
        off, label = rng.choice([(-EPS * T, "just before"), (0.0, "at"), (EPS * T, "just after")])
        if rng.random() < 0.2:
            off, label = -rng.random() * HONEST_DELAY * T, "shortly before"
        return d + off, f"{label} {ctx.name(target)}'s deadline {d:.3f}"

    def send(self, rng: random.Random, key: str, s: Signed, dests: Sequence[bytes], note: str = "") -> None:
        """Deliver `s` to `dests`, each at its own anchor."""
        for d in dests:
            t, where = self.anchor(rng, d)
            self.ctx.deliver(
                (d,),
                s.raw,
                t,
                key=f"{key}:{self.ctx.name(d)}",
                what=f"{note}{describe_message(s, self.ctx.names)} {where}",
            )


class Adversary:
    """Routes Byzantine traffic through its tactics (the first that takes a message decides its fate; all
    see every event). With no tactic it relays everything at once: the Byzantine peers behave honestly."""

    def __init__(self, ctx: Run, tactics: Sequence[Tactic]) -> None:
        self.ctx = ctx
        self.tactics = list(tactics)
        for t in self.tactics:
            t.bind(ctx)

    def begin_step(self) -> None:
        for t in self.tactics:
            t.begin_step()

    def on_byz_send(self, src: bytes, dests: Sequence[bytes], s: Signed) -> None:
        for t in self.tactics:
            t.on_byz_send(src, dests, s)

    def route(self, src: bytes, dest: bytes, s: Signed) -> bool:
        return any(t.route(src, dest, s) for t in self.tactics)

    def observe(self, src: bytes, dests: Sequence[bytes], raw: bytes) -> None:
        for t in self.tactics:
            t.observe(src, dests, raw)

    def on_phase(self, pid: bytes, phase: Phase) -> None:
        for t in self.tactics:
            t.on_phase(pid, phase)

    def on_deadline(self, pid: bytes, deadline: float) -> None:
        for t in self.tactics:
            t.on_deadline(pid, deadline)

    def on_result(self, pid: bytes) -> None:
        for t in self.tactics:
            t.on_result(pid)


class Withhold(Tactic):
    """Each Byzantine message, per honest destination: dropped, or held and released at an anchor (just
    before, at or after a deadline, or shortly), so honest peers see it at different points of their barriers."""

    name = "withhold"

    def __init__(self, rate: float = 0.4, drop: float = 0.3) -> None:
        super().__init__(rate)
        self.drop = drop

    def route(self, src: bytes, dest: bytes, s: Signed) -> bool:
        key = self.key(self.ctx.name(src), s.msg.kind.name, s.msg_digest.hex()[:8], self.ctx.name(dest))
        rng = self.ctx.rng(key)
        if rng.random() >= self.rate or not self.ctx.enabled(key):
            return False
        what = describe_message(s, self.ctx.names)
        if rng.random() < self.drop:
            self.ctx.log(key, f"drop {what} → {self.ctx.name(dest)}")
            return True
        t, where = self.anchor(rng, dest)
        self.ctx.deliver((dest,), s.raw, t, what=f"hold {what} until {where}", key=key)
        return True


class Equivocate(Tactic):
    """Second versions of Byzantine content and round messages (GRAD_COMMIT, GRAD_PART, AGG_COMMIT/PART, MPRNG,
    PROJ, DIGEST), each shown to a random subset of honest peers at its own anchor; sometimes the first version
    is withheld from that subset."""

    name = "equivocate"
    KINDS = (
        Kind.GRAD_COMMIT, Kind.GRAD_PART, Kind.AGG_COMMIT, Kind.AGG_PART, Kind.MPRNG_COMMIT,
        Kind.MPRNG_REVEAL, Kind.PROJ, Kind.DIGEST,
    )  # fmt: skip

    def begin_step(self) -> None:
        self.replaced: set[tuple[bytes, bytes]] = set()  # (message digest, dest) whose first version is held
        self.done: set[bytes] = set()  # messages already given a second version (re-sends get none)

    def on_byz_send(self, src: bytes, dests: Sequence[bytes], s: Signed) -> None:
        if s.msg.kind not in self.KINDS or s.msg.step != self.ctx.step or s.msg.sender != src:
            return
        if s.msg_digest in self.done or s.msg_digest in self.ctx.forged:
            return
        self.done.add(s.msg_digest)
        key = self.key(self.ctx.name(src), s.msg.kind.name, s.msg_digest.hex()[:8])
        rng = self.ctx.rng(key)
        if rng.random() >= self.rate:
            return
        v2 = second_version(s.msg, rng)
        if v2 is None:
            return
        targets = self.subset(rng)
        if rng.random() < 0.3:
            for d in targets:
                self.replaced.add((s.msg_digest, d))
        self.send(rng, key, self.ctx.sign(v2), targets, note="second version ")
        if rng.random() < 0.2:  # a third version, to other peers
            v3 = second_version(v2, rng)
            self.send(rng, key + ":v3", self.ctx.sign(v3), self.subset(rng), note="third version ")

    def route(self, src: bytes, dest: bytes, s: Signed) -> bool:
        if (s.msg_digest, dest) not in self.replaced:
            return False
        key = self.key("replace", s.msg_digest.hex()[:8], self.ctx.name(dest))
        if not self.ctx.enabled(key):
            return False
        self.ctx.log(key, f"drop first version {describe_message(s, self.ctx.names)} → {self.ctx.name(dest)}")
        return True


class LatePart(Tactic):
    """Issue 10's attack and its variations: on each Byzantine GRAD_PART of the current step, a second version
    (other data, same slot) to ONE honest non-aggregator, at an anchor (default: shortly into the step)."""

    name = "late-part"

    def __init__(
        self,
        rate: float = 0.5,
        steps: Sequence[int] | None = None,
        delay: float | None = None,
        limit: int | None = None,
    ) -> None:
        super().__init__(rate)
        self.steps = steps  # the steps it acts in (None: all)
        self.delay = delay  # deliver at step start + delay·T (None: at a random anchor)
        self.left = limit  # at most this many second versions in the whole run (None: no bound)

    def begin_step(self) -> None:
        self.done: set[bytes] = set()

    def on_byz_send(self, src: bytes, dests: Sequence[bytes], s: Signed) -> None:
        m = s.msg
        if m.kind != Kind.GRAD_PART or m.step != self.ctx.step or m.sender != src:
            return
        if s.msg_digest in self.done or s.msg_digest in self.ctx.forged:
            return
        self.done.add(s.msg_digest)
        if self.steps is not None and m.step not in self.steps:
            return
        key = self.key(self.ctx.name(src), m.part)
        rng = self.ctx.rng(key)
        others = [h for h in self.ctx.live_honest() if h not in dests]
        if rng.random() >= self.rate or not others or self.left == 0:
            return
        if self.left is not None:
            self.left -= 1
        target = rng.choice(others)
        forged = self.ctx.sign(second_version(m, rng))
        if self.delay is None:
            self.send(rng, key, forged, [target], note="second version ")
            return
        self.ctx.deliver(
            (target,),
            forged.raw,
            self.ctx.step_start + self.delay * self.ctx.T,
            key=f"{key}:{self.ctx.name(target)}",
            what=f"second version {describe_message(forged, self.ctx.names)} at step start + {self.delay}T",
        )


class Replay(Tactic):
    """Duplicates and replays: messages seen in this or the last step (any sender) re-delivered to random honest
    peers at anchors, and Byzantine messages for the next step (buffered by honest peers, then clashing with
    what the Byzantine peer really sends there)."""

    name = "replay"

    def begin_step(self) -> None:
        old = getattr(self, "seen", [])
        self.previous: list[bytes] = old[-200:]
        self.seen: list[bytes] = []

    def observe(self, src: bytes, dests: Sequence[bytes], raw: bytes) -> None:
        if len(self.seen) < 2000:
            self.seen.append(raw)

    def on_byz_send(self, src: bytes, dests: Sequence[bytes], s: Signed) -> None:
        if len(self.seen) < 2000:
            self.seen.append(s.raw)
        key = self.key("future", self.ctx.name(src), s.msg.kind.name, s.msg_digest.hex()[:8])
        rng = self.ctx.rng(key)
        if s.msg.sender == src and s.msg.kind in Equivocate.KINDS and rng.random() < 0.1 * self.rate:
            nxt = dataclasses.replace(s.msg, step=s.msg.step + 1)
            v = second_version(nxt, rng) if rng.random() < 0.5 else nxt
            self.send(rng, key, self.ctx.sign(v), self.subset(rng), note="next-step ")

    def on_phase(self, pid: bytes, phase: Phase) -> None:
        key = self.key("replay", self.ctx.name(pid), phase.name)
        rng = self.ctx.rng(key)
        pool = self.seen + self.previous
        if not pool or rng.random() >= self.rate:
            return
        for i in range(rng.randrange(1, 4)):
            raw = rng.choice(pool)
            s = decode(raw, self.ctx.cfg.limits)
            self.send(rng, f"{key}:{i}", s, self.subset(rng), note="replay ")


class Accusations(Tactic):
    """Byzantine ACCUSE messages against anyone (honest or Byzantine), for this or the last step, with evidence
    that is genuine (a real second version of a Byzantine message: a valid proof) or bogus (honest messages,
    wrong reasons), to random honest subsets at anchors, triggered by honest peers' phase changes."""

    name = "accuse"

    def begin_step(self) -> None:
        self.pool: list[Signed] = []  # messages of this step usable as evidence

    def observe(self, src: bytes, dests: Sequence[bytes], raw: bytes) -> None:
        if len(self.pool) < 500:
            s = decode(raw, self.ctx.cfg.limits)
            if s.msg.kind in Equivocate.KINDS and s.msg.kind != Kind.DIGEST:
                self.pool.append(s)

    def on_byz_send(self, src: bytes, dests: Sequence[bytes], s: Signed) -> None:
        if len(self.pool) < 500 and s.msg.kind in Equivocate.KINDS and s.msg.kind != Kind.DIGEST:
            self.pool.append(s)

    def on_phase(self, pid: bytes, phase: Phase) -> None:
        key = self.key(self.ctx.name(pid), phase.name)
        rng = self.ctx.rng(key)
        if rng.random() >= 0.5 * self.rate or not self.pool or not self.ctx.byzantine:
            return
        ctx = self.ctx
        accuser = rng.choice(ctx.byzantine)
        reason = rng.choice(list(Reason))
        ev_msg = rng.choice(self.pool)
        accused = ev_msg.msg.sender
        evidence: tuple[bytes, ...]
        genuine = accused in ctx.byzantine and rng.random() < 0.5
        if genuine:  # a real equivocation proof against a Byzantine peer
            v2 = second_version(ev_msg.msg, rng)
            evidence = (ev_msg.raw, ctx.sign(v2).raw) if v2 is not None else (ev_msg.raw,)
            reason = Reason.EQUIVOCATION
        else:
            k = rng.randrange(1, 3)
            evidence = tuple(rng.choice(self.pool).raw for _ in range(k))
            if rng.random() < 0.3:
                accused = rng.choice(ctx.live_honest())
        about = ctx.step if rng.random() < 0.8 or ctx.step == 0 else ctx.step - 1
        acc = Accuse(
            RUN_ID, ctx.step, accuser, accused, about, reason, getattr(ev_msg.msg, "part", 0), evidence
        )
        self.send(rng, key, ctx.sign(acc), self.subset(rng), note="genuine " if genuine else "bogus ")


class Digests(Tactic):
    """Byzantine round messages and pulls listing arbitrary items: real items of the phase (including second
    versions only some honest peers hold), made-up digests, any round, any support, to random honest subsets at
    anchors; and public or private PULLs for arbitrary slots."""

    name = "digest"

    def begin_step(self) -> None:
        self.items: dict[int, list[tuple[int, bytes, int, bytes]]] = defaultdict(list)  # phase -> entries
        self.rounds: list[bytes] = []  # digests of round messages seen

    def _note(self, s: Signed) -> None:
        m = s.msg
        if m.kind == Kind.DIGEST:
            self.rounds.append(s.msg_digest)
            for e in m.entries:
                self.items[m.phase].append(e)
            return
        ph = KIND_PHASE.get(m.kind, Phase.ACCUSE if m.kind in BARRIER_KINDS[Phase.ACCUSE] else None)
        if ph is not None and len(self.items[int(ph)]) < 300:
            slot = m.slot()
            idx = slot[2] if isinstance(slot[2], int) else 0
            self.items[int(ph)].append((int(m.kind), m.sender, idx, s.msg_digest))

    def observe(self, src: bytes, dests: Sequence[bytes], raw: bytes) -> None:
        self._note(decode(raw, self.ctx.cfg.limits))

    def on_byz_send(self, src: bytes, dests: Sequence[bytes], s: Signed) -> None:
        self._note(s)

    def on_phase(self, pid: bytes, phase: Phase) -> None:
        ctx = self.ctx
        key = self.key(ctx.name(pid), phase.name)
        rng = ctx.rng(key)
        if rng.random() >= 0.6 * self.rate or not ctx.byzantine:
            return
        sender = rng.choice(ctx.byzantine)
        if rng.random() < 0.25:  # a pull
            origin = rng.choice([*ctx.honest, *ctx.byzantine])
            kind = rng.choice([Kind.GRAD_PART, Kind.AGG_PART, Kind.GRAD_COMMIT, Kind.ACCUSE])
            public = kind == Kind.GRAD_PART and rng.random() < 0.7
            idx = rng.randrange(ctx.schedule.n)
            pull = Pull(RUN_ID, ctx.step, sender, int(kind), origin, idx, public)
            self.send(rng, key, ctx.sign(pull), self.subset(rng))
            return
        barrier = [int(p) for p in BARRIER_KINDS]
        ph = int(phase) if int(phase) in barrier and rng.random() < 0.7 else rng.choice(barrier)
        rounds = max(1, ctx.peers[pid].rounds)
        k = rng.randrange(1, rounds + 1)
        pool = self.items.get(ph, [])
        entries = rng.sample(pool, min(len(pool), rng.randrange(0, 4))) if pool else []
        if rng.random() < 0.3:
            entries.append(
                (int(rng.choice(BARRIER_KINDS[Phase(ph)])), rng.choice(ctx.honest), 0, rng.randbytes(32))
            )
        support = tuple(rng.sample(self.rounds, min(len(self.rounds), rng.randrange(0, 3))))
        dig = Digest(RUN_ID, ctx.step, sender, ph, k, tuple(dict.fromkeys(entries)), support)
        self.send(rng, key, ctx.sign(dig), self.subset(rng))


class JoinLeave(Tactic):
    """JOINs from outsider identities and LEAVEs from Byzantine members, to random honest subsets at anchors."""

    name = "join-leave"

    def on_phase(self, pid: bytes, phase: Phase) -> None:
        ctx = self.ctx
        key = self.key(ctx.name(pid), phase.name)
        rng = ctx.rng(key)
        if rng.random() >= 0.3 * self.rate:
            return
        if rng.random() < 0.6 or not ctx.byzantine:
            who = ctx.outsider(rng.randrange(3))
            step = max(0, ctx.step + rng.choice((0, 0, 1, -1)))  # a JOIN names a nearby step
            msg: Message = Join(RUN_ID, step, who.peer_id)
        else:
            msg = Leave(RUN_ID, ctx.step, rng.choice(ctx.byzantine))
        self.send(rng, key, ctx.sign(msg), self.subset(rng))


def _mixed() -> list[Tactic]:
    return [
        Withhold(0.2),
        Equivocate(0.15),
        LatePart(0.15),
        Replay(0.3),
        Accusations(0.5),
        Digests(0.5),
        JoinLeave(0.5),
    ]


STRATEGIES: dict[str, Callable[[], list[Tactic]]] = {
    "honest": list,
    "withhold": lambda: [Withhold()],
    "equivocate": lambda: [Equivocate(0.3)],
    "late-part": lambda: [LatePart()],
    "replay": lambda: [Replay()],
    "accuse": lambda: [Accusations()],
    "digest": lambda: [Digests()],
    "join-leave": lambda: [JoinLeave()],
    "mixed": _mixed,
}
"""Strategy families: name -> a factory of fresh tactics (each schedule gets its own)."""


def run_schedule(schedule: Schedule, tactics: Sequence[Tactic] | None = None) -> Outcome:
    """Run one schedule with the tactics of `schedule.strategy` (or the given ones) and check every step."""
    ctx = Run(schedule)
    chosen = STRATEGIES[schedule.strategy]() if tactics is None else list(tactics)
    return ctx.run(Adversary(ctx, chosen))


def minimize(
    outcome: Outcome,
    run: Callable[[Schedule], Outcome] = run_schedule,
    max_runs: int = 200,
) -> Outcome:
    """Disable as many adversary actions as possible while the run still fails the same way (greedy,
    chunks of halving size). Returns the rerun outcome of the smallest failing schedule found."""
    if not outcome.failed:
        return outcome
    kind = next(f.kind for f in outcome.failures if f.kind in SERIOUS)
    best, runs = outcome, 0
    chunk = max(1, len({a.key for a in best.actions if a.key}) // 2)
    while chunk >= 1 and runs < max_runs:
        keys = list(dict.fromkeys(a.key for a in best.actions if a.key))
        progress = False
        for i in range(0, len(keys), chunk):
            if runs >= max_runs:
                break
            trial_sched = dataclasses.replace(
                best.schedule, disabled=best.schedule.disabled | set(keys[i : i + chunk])
            )
            trial = run(trial_sched)
            runs += 1
            if trial.has(kind):
                best, progress = trial, True
        if not progress:
            if chunk == 1:
                break
            chunk //= 2
    return best
