"""Audit log: every signed message a peer sent or accepted, every step's decisions, in a signed hash chain.

Format: JSON lines. Each record carries ``prev`` (hex BLAKE3 of the previous line); each ``step`` record is
signed by the log's owner over the chain head, so a third party detects any edited, inserted or deleted line.
`verify_log` re-checks offline: the chain and owner signatures, every message signature, the chain of r^t
(recomputed from the MPRNG commits and reveals in the log) and every ban whose evidence is self-contained
(equivocation, commit mismatch, non-finite part, MPRNG mismatch). Bans that need the model (a validator's
recomputation), the step's aggregate or its part sizes (a mis-shaped part) are checked for the presence and
signatures of their evidence and reported as such.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from btard.crypto import Identity, bytes_digest, digest, verify
from btard.protocol.config import ProtocolConfig
from btard.protocol.decision import Agreed, Prior, StepFacts, decide, shared_random
from btard.protocol.errors import LocalProtocolError, MalformedMessage
from btard.protocol.events import StepResult
from btard.protocol.evidence import StepView
from btard.protocol.messages import Accuse, Kind, Limits, Reason, Signed, decode
from btard.protocol.state import KIND_PHASE

SELF_CONTAINED = {
    "equivocation",
    "commit-mismatch",
    "nonfinite",
    "mprng-mismatch",
}


def _record_digest(rec: dict) -> bytes:
    """What the owner signs: the canonical JSON of a step record without its signature and chain link."""
    body = {k: v for k, v in rec.items() if k not in ("sig", "prev")}
    return digest("audit-step", json.dumps(body, sort_keys=True, separators=(",", ":")))


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s.encode(), validate=True)


class AuditLog:
    """Append-only audit log of one peer. Use as the peer's ``audit`` callback."""

    def __init__(
        self, identity: Identity, sink: IO[str] | None = None, *, path: str | Path | None = None
    ) -> None:
        self.identity = identity
        self._own_file = None
        if path is not None:
            self._own_file = open(path, "w")  # noqa: SIM115 - closed by close()
            sink = self._own_file
        self.sink = sink
        self.lines: list[str] = []
        self._head = digest("audit-genesis", identity.peer_id)
        self._seen: set[bytes] = set()
        self._write({"t": "header", "owner": identity.peer_id.hex()})

    def _write(self, rec: dict) -> None:
        rec["prev"] = self._head.hex()
        line = json.dumps(rec, sort_keys=True, separators=(",", ":"))
        self._head = digest("audit-line", line)
        self.lines.append(line)
        if self.sink is not None:
            self.sink.write(line + "\n")
            self.sink.flush()

    def __call__(self, kind: str, obj: object) -> None:
        if kind == "msg":
            assert isinstance(obj, Signed)
            if obj.msg_digest in self._seen:
                return
            self._seen.add(obj.msg_digest)
            self._write({"t": "msg", "raw": _b64(obj.raw)})
        elif kind == "reject":
            self._write({"t": "reject", **obj})  # type: ignore[dict-item]
        elif kind == "config":
            assert isinstance(obj, ProtocolConfig)
            self._write({"t": "config", **_config_record(obj)})
        elif kind == "begin":
            assert isinstance(obj, Prior)
            self._write({"t": "begin", **_prior_record(obj)})
        elif kind == "step":
            assert isinstance(obj, StepResult)
            rec = {
                "t": "step",
                "step": obj.step,
                "r": obj.r.hex(),
                "members": [m.hex() for m in obj.members],
                "next_members": [m.hex() for m in obj.next_members],
                "excluded": [m.hex() for m in obj.excluded],
                "next_validators": {v.hex(): t.hex() for v, t in sorted(obj.next_validators.items())},
                "next_phase_timeout": obj.next_phase_timeout,
                "aggregate": digest("aggregate", obj.aggregate.numpy().tobytes()).hex(),
                "agreed": [d.hex() for d in obj.agreed],
                "verdicts": [
                    {
                        "banned": v.banned.hex(),
                        "code": v.code.value,
                        "reason": v.reason,
                        "accuser": v.accuser.hex() if v.accuser else None,
                        "evidence": [e.hex() for e in v.evidence],
                    }
                    for v in obj.verdicts
                ],
                "head": self._head.hex(),
            }
            rec["sig"] = self.identity.sign(_record_digest(rec)).hex()
            self._write(rec)

    def close(self) -> None:
        if self._own_file is not None:
            self._own_file.close()


@dataclass
class AuditReport:
    ok: bool
    problems: list[str] = field(default_factory=list)
    messages: int = 0
    steps: int = 0
    verdicts_verified: int = 0
    verdicts_needing_model: int = 0
    decisions_recomputed: int = 0  # steps whose whole outcome was recomputed from the logged agreed items

    def summary(self) -> str:
        head = "OK" if self.ok else "FAILED"
        lines = [
            f"audit {head}: {self.steps} steps, {self.messages} signed messages, "
            f"{self.verdicts_verified} bans re-derived from their evidence, "
            f"{self.verdicts_needing_model} bans whose evidence is present and signed but needs the model "
            "or aggregate to re-derive; "
            f"{self.decisions_recomputed} of {self.steps} steps' decisions recomputed from their agreed items"
        ]
        lines += [f"  problem: {p}" for p in self.problems[:50]]
        return "\n".join(lines)


def verify_log(lines: list[str], run_id: bytes | None = None, limits: Limits = Limits()) -> AuditReport:
    """Verify an audit log offline (see module docstring for what is checked)."""
    rep = AuditReport(ok=True)
    problems = rep.problems
    if not lines:
        return AuditReport(False, ["empty log"])
    try:
        first = json.loads(lines[0])
        owner = bytes.fromhex(first["owner"])
    except (ValueError, KeyError, TypeError):
        return AuditReport(False, ["line 1: not an audit log header"])
    head = digest("audit-genesis", owner)
    msgs: dict[bytes, Signed] = {}
    by_step: dict[int, list[Signed]] = {}
    prev_r: bytes | None = None
    replay = _Replay()
    for no, line in enumerate(lines, start=1):
        try:
            rec = json.loads(line)
        except ValueError:
            problems.append(f"line {no}: not JSON")
            break
        if rec.get("prev") != head.hex():
            problems.append(f"line {no}: hash chain broken (line edited, inserted or deleted before it)")
            break
        head_before = head
        head = digest("audit-line", line)
        t = rec.get("t")
        if t == "msg":
            try:
                s = decode(_unb64(rec["raw"]), limits)
            except (MalformedMessage, ValueError, KeyError) as e:
                problems.append(f"line {no}: message does not verify ({e})")
                continue
            rep.messages += 1
            msgs[s.msg_digest] = s
            by_step.setdefault(s.msg.step, []).append(s)
            if run_id is None:
                run_id = s.msg.run_id
        elif t == "config":
            replay.config = _config_from(rec)
            if replay.config is None:
                problems.append(f"line {no}: malformed config record")
        elif t == "begin":
            replay.prior = _prior_from(rec)
            if replay.prior is None:
                problems.append(f"line {no}: malformed begin record")
        elif t == "step":
            rep.steps += 1
            step = rec["step"]
            if rec.get("head") != head_before.hex():
                problems.append(f"line {no}: step record head mismatch")
            if not verify(owner, _record_digest(rec), bytes.fromhex(rec.get("sig", ""))):
                problems.append(f"line {no}: step {step} record is not signed by the log owner")
            members = [bytes.fromhex(m) for m in rec["members"]]
            step_msgs = by_step.get(step, [])
            if "agreed" in rec:  # the decisions use the agreed items only (late messages are logged too)
                try:
                    agreed = {bytes.fromhex(d) for d in rec["agreed"]}
                except (TypeError, ValueError):
                    problems.append(f"line {no}: step {step} record has a malformed agreed list")
                    agreed = set()
                step_msgs = [s for s in step_msgs if s.msg_digest in agreed]
            r_prev = prev_r if prev_r is not None else None
            if r_prev is not None and run_id is not None:
                r = shared_random(run_id, step, r_prev, members, _agreed_items(step_msgs).slots)
                if r.hex() != rec["r"]:
                    problems.append(f"line {no}: r^{step} does not follow from the logged MPRNG reveals")
            prev_r = bytes.fromhex(rec["r"])
            for v in rec["verdicts"]:
                _check_verdict(v, step, msgs, limits, rep, no)
            replay.check_step(rec, msgs, rep, no)
    rep.ok = not problems
    return rep


def _check_verdict(
    v: dict, step: int, msgs: dict[bytes, Signed], limits: Limits, rep: AuditReport, no: int
) -> None:
    banned = bytes.fromhex(v["banned"])
    reason = v["reason"]
    if reason.startswith("aggregate of part"):
        rep.verdicts_needing_model += 1  # needs the step's PROJ values and aggregate: re-derivable by a peer
        return
    ev = [bytes.fromhex(e) for e in v["evidence"]]
    acc = [msgs.get(e) for e in ev]
    if reason == "equivocation" and v.get("accuser") is None:  # two agreed versions of one slot
        two = [a for a in acc if a is not None]
        if (
            len(two) == 2
            and all(a.msg.sender == banned and a.msg.kind != Kind.ACCUSE for a in two)
            and two[0].msg.slot() == two[1].msg.slot()
            and two[0].msg.step == two[1].msg.step
            and two[0].msg_digest != two[1].msg_digest
        ):
            rep.verdicts_verified += 1
        else:
            rep.problems.append(f"line {no}: equivocation ban of {banned.hex()[:8]} without two versions")
        return
    if not acc or any(a is None or a.msg.kind != Kind.ACCUSE for a in acc):
        rep.problems.append(
            f"line {no}: ban of {banned.hex()[:8]} ({reason}) cites an accusation not in the log"
        )
        return
    a: Accuse = acc[0].msg
    try:
        evidence = [decode(raw, limits) for raw in a.evidence]
    except MalformedMessage:
        evidence = None
    if reason.startswith("false accusation"):
        if banned != a.sender:
            rep.problems.append(f"line {no}: false-accusation ban names someone other than the accuser")
        elif (
            evidence is not None
            and a.reason.name.lower().replace("_", "-") in SELF_CONTAINED
            and _self_contained_proof(a, evidence)
        ):
            rep.problems.append(f"line {no}: accuser {banned.hex()[:8]} banned although its evidence holds")
            return
        rep.verdicts_verified += 1
        return
    if banned != a.accused or evidence is None:
        rep.problems.append(f"line {no}: ban of {banned.hex()[:8]} does not match its accusation")
        return
    if reason in SELF_CONTAINED:
        if _self_contained_proof(a, evidence):
            rep.verdicts_verified += 1
        else:
            rep.problems.append(f"line {no}: evidence does not prove {reason} by {banned.hex()[:8]}")
    else:
        rep.verdicts_needing_model += 1


def _self_contained_proof(a: Accuse, ev: list[Signed]) -> bool:
    if any(e.msg.sender != a.accused for e in ev):
        return False
    r = a.reason
    if r == Reason.EQUIVOCATION and len(ev) == 2:
        m1, m2 = ev[0].msg, ev[1].msg
        if m1.kind == m2.kind and m1.step == m2.step and m1.slot() == m2.slot():
            return ev[0].msg_digest != ev[1].msg_digest
        if (
            {m1.kind, m2.kind} == {Kind.AGG_COMMIT, Kind.AGG_PART}
            and m1.part == m2.part
            and m1.step == m2.step
        ):
            c, p = (m1, m2) if m1.kind == Kind.AGG_COMMIT else (m2, m1)
            return bytes_digest("agg-part", p.run_id, p.step, p.sender, p.part, p.data) != c.agg_hash
        return False
    if r == Reason.COMMIT_MISMATCH and len(ev) == 2:
        c, p = ev[0].msg, ev[1].msg
        if c.kind != Kind.GRAD_COMMIT or p.kind != Kind.GRAD_PART or c.step != p.step:
            return False
        if p.part >= len(c.part_hashes):
            return True
        return bytes_digest("grad-part", p.run_id, p.step, p.sender, p.part, p.data) != c.part_hashes[p.part]
    if r == Reason.NONFINITE and len(ev) == 1:
        import numpy as np

        return (
            ev[0].msg.kind in (Kind.GRAD_PART, Kind.AGG_PART)
            and not np.isfinite(np.frombuffer(ev[0].msg.data, dtype="<f4")).all()
        )
    if r == Reason.BAD_SHAPE and len(ev) == 1:
        return ev[0].msg.kind in (
            Kind.GRAD_PART,
            Kind.AGG_PART,
        )  # the length is checked against n and d online
    if r == Reason.MPRNG_MISMATCH and len(ev) == 2:
        c, rv = ev[0].msg, ev[1].msg
        return (
            c.kind == Kind.MPRNG_COMMIT
            and rv.kind == Kind.MPRNG_REVEAL
            and digest("mprng", rv.run_id, rv.step, rv.sender, rv.secret) != c.commitment
        )
    return False


# ---------------------------------------------------------------------------------------------------- replay
_CONFIG_FIELDS = (
    "dim",
    "tau",
    "lam",
    "eps_rel",
    "max_iter",
    "num_projections",
    "plausibility",
    "validators",
    "validation_rtol",
    "validation_mode",
    "phase_timeout",
    "max_joins_per_step",
    "probation_steps",
    "max_faulty",
)


def _config_record(cfg: ProtocolConfig) -> dict:
    rec = {k: getattr(cfg, k) for k in _CONFIG_FIELDS}
    rec["run_id"] = cfg.run_id.hex()
    rec["limits"] = dict(vars(cfg.limits))
    return rec


def _config_from(rec: dict) -> ProtocolConfig | None:
    try:
        return ProtocolConfig(
            run_id=bytes.fromhex(rec["run_id"]),
            limits=Limits(**rec["limits"]),
            **{k: rec[k] for k in _CONFIG_FIELDS},
        )
    except (KeyError, TypeError, ValueError, LocalProtocolError):
        return None


def _prior_record(p: Prior) -> dict:
    return {
        "step": p.step,
        "members": [m.hex() for m in p.members],
        "validators": {v.hex(): t.hex() for v, t in sorted(p.validators.items())},
        "observers": sorted(o.hex() for o in p.observers),
        "probation": {k.hex(): v for k, v in sorted(p.probation.items())},
        "banned": sorted(b.hex() for b in p.banned),
        "r_prev": p.r_prev.hex(),
        "phase_timeout": p.phase_timeout,
    }


def _prior_from(rec: dict) -> Prior | None:
    try:
        return Prior(
            step=int(rec["step"]),
            members=tuple(bytes.fromhex(m) for m in rec["members"]),
            validators={bytes.fromhex(v): bytes.fromhex(t) for v, t in rec["validators"].items()},
            observers=frozenset(bytes.fromhex(o) for o in rec["observers"]),
            probation={bytes.fromhex(k): int(v) for k, v in rec["probation"].items()},
            banned=frozenset(bytes.fromhex(b) for b in rec["banned"]),
            r_prev=bytes.fromhex(rec["r_prev"]),
            phase_timeout=float(rec["phase_timeout"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


class _Replay:
    """Recomputes each step's decision (`decision.decide`) from the agreed items the log holds and compares it
    with the step record the owner signed. A step is recomputed when the log has the run's config, the step's
    begin record and every agreed item (a swarm peer leaves gradient and aggregate parts out of its log unless
    run with --audit-parts: such steps are checked only for r and self-contained bans)."""

    def __init__(self) -> None:
        self.config: ProtocolConfig | None = None
        self.prior: Prior | None = None
        self._prev_view: StepView | None = None  # the last recomputed step, for accusations carried from it

    def check_step(self, rec: dict, msgs: dict[bytes, Signed], rep: AuditReport, no: int) -> None:
        cfg, prior = self.config, self.prior
        try:
            step = int(rec["step"])
            agreed_ids = [bytes.fromhex(d) for d in rec.get("agreed", [])]
        except (TypeError, ValueError):
            return
        if cfg is None or prior is None or prior.step != step or any(d not in msgs for d in agreed_ids):
            return
        facts = StepFacts(cfg, prior, _agreed_items([msgs[d] for d in agreed_ids]))
        logged = {v.get("banned"): v for v in rec.get("verdicts", []) if isinstance(v, dict)}

        def validation(a: Accuse, ev: list[Signed]) -> bool | None:
            v = logged.get(a.accused.hex()) or logged.get(a.sender.hex())
            if v is None:
                return None
            return v.get("banned") == a.accused.hex()  # needs the model: the logged verdict, checked for form

        out = decide(facts, previous=self._prev_view, validation=validation)
        mine = {
            "r": out.r.hex(),
            "next_members": [m.hex() for m in out.next_members],
            "excluded": [m.hex() for m in out.excluded],
            "aggregate": digest("aggregate", out.aggregate.numpy().tobytes()).hex(),
            "verdicts": sorted((v.banned.hex(), v.reason) for v in out.verdicts),
            "next_validators": {v.hex(): t.hex() for v, t in sorted(out.next_validators.items())},
        }
        theirs = dict(rec)
        theirs["verdicts"] = sorted(
            (v.get("banned"), v.get("reason")) for v in rec.get("verdicts", []) if isinstance(v, dict)
        )
        for key, value in mine.items():
            if key in theirs and theirs[key] != value:
                rep.problems.append(f"line {no}: step {step}: {key} does not follow from the agreed items")
        rep.decisions_recomputed += 1
        self._prev_view = StepView(step, facts.bounds, facts.view().commits, out.published.get, facts.z)


def _agreed_items(items: list[Signed]) -> Agreed:
    """The agreed items of a step, sorted into slots (two versions: equivocation) and ACCUSE-phase items."""
    by_slot: dict[tuple, list[Signed]] = {}
    accusations: dict[bytes, Signed] = {}
    public: dict[bytes, Signed] = {}
    for s in items:
        m = s.msg
        if m.kind in KIND_PHASE:
            by_slot.setdefault(m.slot(), []).append(s)
        elif m.kind == Kind.ACCUSE:
            accusations[s.msg_digest] = s
        else:
            public[s.msg_digest] = s
    slots, equivocated = {}, {}
    for slot, vers in by_slot.items():
        vers.sort(key=lambda v: v.msg_digest)
        if len(vers) == 1:
            slots[slot] = vers[0]
        else:
            equivocated[slot] = (vers[0], vers[1])
    return Agreed(slots, equivocated, accusations, public)
