"""Every protocol attack of attacks.md against the real state machine: (attack, expected outcome) as a table.

For every row: the expected outcome holds, no honest peer is banned or excluded, honest peers agree on ĝ,
r^t, verdicts and the next active set, and every honest peer's audit log verifies.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from btard.attacks import protocol as pa
from btard.protocol.audit import verify_log
from btard.protocol.harness import Crash
from btard.protocol.state import Phase

from .conftest import make_swarm

N, BYZ = 6, 2


@dataclass(frozen=True)
class Expect:
    banned: str | None = None  # substring of the verdict reason, or None
    excluded: bool = False
    rejected: bool = False
    step: int = 0  # the step at which the outcome must occur


TABLE = [
    ("wrong-aggregate-small", lambda: pa.WrongAggregate(scale=0.01), Expect(banned="projection check")),
    ("wrong-aggregate-large", lambda: pa.WrongAggregate(scale=1000.0), Expect(banned="projection check")),
    ("equivocate-aggregate", pa.EquivocateAggregate, Expect(banned="equivocation")),
    ("equivocate-commit", pa.EquivocateCommit, Expect(banned="equivocation")),
    ("commit-mismatch", pa.CommitMismatch, Expect(banned="commit-mismatch")),
    ("bad-shape", pa.BadShapePart, Expect(banned="bad-shape")),
    ("nan-part", pa.NaNPart, Expect(banned="nonfinite")),
    ("lying-projections", pa.LyingProjections, Expect(banned="wrong-projection")),
    ("false-accusation", pa.FalseAccusation, Expect(banned="false accusation")),
    ("framing-by-omission", pa.FramingByOmission, Expect()),  # the public re-send clears the victim
    ("mprng-withhold", pa.WithholdReveal, Expect(excluded=True)),
    ("mprng-alter", pa.AlterReveal, Expect(banned="mprng-mismatch")),
    ("silent-sender", lambda: pa.Silent(Phase.SCATTER), Expect(excluded=True)),
    ("replay", lambda: pa.Replay(start=1), Expect(rejected=True, step=1)),
    ("malformed", pa.Malformed, Expect(rejected=True)),
]


def check_agreement(swarm, res):
    honest = [p for p in swarm.honest if p in res]
    assert honest, "no honest peer finished"
    first = res[honest[0]]
    for p in honest:
        r = res[p]
        assert torch.equal(r.aggregate, first.aggregate)
        assert r.r == first.r and r.next_members == first.next_members and r.verdicts == first.verdicts
        assert r.excluded == first.excluded
    banned = {v.banned for v in first.verdicts}
    assert not banned & set(swarm.honest), [v.describe() for v in first.verdicts]
    assert not set(first.excluded) & set(swarm.honest)
    return first


@pytest.mark.parametrize("name,make,expect", TABLE, ids=[t[0] for t in TABLE])
def test_protocol_attack(name, make, expect):
    swarm = make_swarm(N, seed=7, behaviours={BYZ: make()}, validators=0)
    attacker = swarm.ids[BYZ]
    outcome_seen = False
    for step in range(2):
        res = swarm.step()
        first = check_agreement(swarm, res)
        reasons = [v.reason for v in first.verdicts if v.banned == attacker]
        if step == expect.step:
            if expect.banned:
                assert reasons and expect.banned in reasons[0], (name, [v.describe() for v in first.verdicts])
                assert attacker not in first.next_members
            if expect.excluded:
                assert attacker in first.excluded and attacker not in first.next_members
            if expect.rejected:
                assert all(res[p].rejected_messages > 0 for p in swarm.honest)
                assert not first.verdicts and not first.excluded
            outcome_seen = True
        if attacker not in first.next_members:
            break
    assert outcome_seen
    for p in swarm.honest:
        rep = verify_log(swarm.audits[p].lines)
        assert rep.ok, rep.summary()


@pytest.mark.parametrize(
    "phase", [Phase.COMMIT, Phase.SCATTER, Phase.AGGREGATE, Phase.MPRNG_REVEAL, Phase.PROJ]
)
def test_crash_at_each_phase_excludes_only_the_crashed_peer(phase):
    swarm = make_swarm(5, seed=3, validators=0)
    victim = swarm.ids[1]
    swarm.harness.crashes[victim] = Crash(step=0, phase=phase)
    swarm.honest.remove(victim)
    res = swarm.step()
    first = check_agreement(swarm, res)
    assert victim not in first.next_members and victim not in res
    assert not first.verdicts
    res = swarm.step()  # the rest carry on without it
    first = check_agreement(swarm, res)
    assert first.members == tuple(p for p in sorted(swarm.ids) if p != victim)


def test_tampered_audit_log_is_rejected():
    swarm = make_swarm(4, seed=1, behaviours={1: pa.CommitMismatch()}, validators=0)
    swarm.step()
    lines = list(swarm.audits[swarm.ids[0]].lines)
    assert verify_log(lines).ok
    # edit a message line, delete a line, and forge a verdict line with a fixed-up hash chain
    edited = list(lines)
    edited[3] = edited[3].replace('"raw":"', '"raw":"AA', 1)
    assert not verify_log(edited).ok
    assert not verify_log(lines[:2] + lines[3:]).ok
    import json

    forged = list(lines)
    idx = max(i for i, ln in enumerate(forged) if '"t":"step"' in ln)
    rec = json.loads(forged[idx])
    rec["verdicts"] = []
    forged[idx] = json.dumps(rec, sort_keys=True, separators=(",", ":"))
    assert not verify_log(forged).ok, "a forged verdict list must break the owner's signature"
