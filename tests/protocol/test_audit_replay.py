"""`btard audit` recomputes every step's decision from the logged agreed items (issue 10).

A log owner holds its own key, so it can re-sign anything; what it cannot do is make a decision follow from
the agreed items when it does not. Each lie below is written by the owner's own `AuditLog` (a valid hash chain
and valid signatures) and must still fail the audit.
"""

from __future__ import annotations

import dataclasses

import pytest

from btard.attacks import protocol as pa
from btard.protocol.audit import verify_log
from btard.protocol.events import BanReason, StepResult, Verdict

from .conftest import make_swarm


def _run(lie=None, steps: int = 3):
    swarm = make_swarm(5, seed=11, behaviours={4: pa.WrongAggregate(scale=1.0)}, validators=1)
    owner = swarm.harness.peers[swarm.ids[0]]
    if lie is not None:
        honest_log = owner._audit

        def lying(kind, obj):
            honest_log(kind, lie(swarm, obj) if kind == "step" else obj)

        owner._audit = lying
    for _ in range(steps):
        swarm.step()
    return swarm, verify_log(swarm.audits[swarm.ids[0]].lines)


def test_an_honest_log_is_recomputed_step_by_step():
    swarm, rep = _run()
    assert rep.ok, rep.summary()
    assert rep.steps == 3 and rep.decisions_recomputed == 3, rep.summary()


def _ban_without_evidence(swarm, res: StepResult) -> StepResult:
    victim = swarm.ids[1]
    if res.step != 1 or victim not in res.next_members:
        return res
    fake = Verdict(
        res.step, victim, BanReason.FAILED_CHECK, "aggregate of part 0 fails the projection check", None
    )
    return dataclasses.replace(
        res,
        verdicts=tuple(sorted(res.verdicts + (fake,), key=lambda v: v.banned)),
        next_members=tuple(p for p in res.next_members if p != victim),
    )


def _drop_a_member(swarm, res: StepResult) -> StepResult:
    victim = swarm.ids[2]
    if res.step != 1:
        return res
    return dataclasses.replace(res, next_members=tuple(p for p in res.next_members if p != victim))


def _other_validators(swarm, res: StepResult) -> StepResult:
    if res.step != 0 or not res.next_validators:
        return res
    v, t = next(iter(res.next_validators.items()))
    other = next(p for p in res.next_members if p not in (v, t))
    return dataclasses.replace(res, next_validators={other: t})


@pytest.mark.parametrize("lie", [_ban_without_evidence, _drop_a_member, _other_validators])
def test_a_decision_that_does_not_follow_from_the_agreed_items_fails(lie):
    _, rep = _run(lie)
    assert not rep.ok
    assert any("does not follow from the agreed items" in p for p in rep.problems), rep.summary()
