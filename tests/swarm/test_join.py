"""Membership changes in a running swarm of real processes: a late joiner is admitted through a JOIN every
member agrees on, observes one step, checks the WELCOME state against the majority's commitments, serves its
probation (validated, not aggregated) and contributes; a member leaves gracefully (LEAVE) without costing a
slow step. Everyone who stays finishes bit-identical."""

from __future__ import annotations

import pytest

from btard.swarm.launcher import PeerRole

from .conftest import PHASE_TIMEOUT, run_swarm

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning"),
    pytest.mark.timeout(200),
]

STEPS, LEAVE_AFTER = 30, 8


def test_late_joiner_and_graceful_leave(tmp_path):
    run = run_swarm(
        tmp_path,
        "join",
        peers=6,
        steps=STEPS,
        validators=1,
        roles={
            4: PeerRole(label="leaves gracefully", extra_args=["--leave-at-step", str(LEAVE_AFTER)]),
            5: PeerRole(label="late joiner", join_at_step=3),
        },
    )
    stay, leaver, joiner = run.peers[:4], run.peers[4], run.peers[5]
    for p in (*stay, joiner):
        assert p.returncode == 0 and p.done and p.done["status"] == "finished", (p.index, p.done)
    assert len({p.done["params_hash"] for p in (*stay, joiner)}) == 1
    assert len(run.checkpoint_digests(STEPS, [*stay, joiner])) == 1
    assert not run.report["honest_banned"]
    assert all(run.report["audit"][p.index]["ok"] for p in run.peers)

    # The leaver completed its last step and stopped; everyone dropped it after that step, at once, with no
    # deadline passing (the step took less than one phase timeout) and nobody excluded.
    assert leaver.returncode == 0 and leaver.done["status"] == "left", leaver.done
    assert [st["step"] for st in leaver.steps] == list(range(LEAVE_AFTER + 1))
    for p in stay:
        last = p.steps[LEAVE_AFTER]
        assert last["left"] == [leaver.short], last
        assert last["deadlines_hit"] == 0 and last["step_seconds"] < PHASE_TIMEOUT, last
        assert not any(st["excluded"] for st in p.steps), p.index

    roles = [st["role"] for st in joiner.steps]
    assert roles[0] == "observer" and roles[1:3] == ["probation", "probation"], roles
    assert "contributor" in roles[3:], roles
    first = joiner.steps[0]["step"]
    assert 3 < first < STEPS and joiner.steps[-1]["step"] == STEPS - 1, first
    num, den = map(int, joiner.steps[0]["state_backers"].split("/"))
    assert 2 * num > den >= 3  # the WELCOME state is what the majority committed
    # Membership, step by step: 5 from the genesis, one fewer after the leave, one more from the joiner's first
    # step (whichever came first), the same at every staying peer.
    for p in stay:
        assert p.steps[first - 1]["joined"] == [joiner.short], p.index
        for st in p.steps:
            s = st["step"]
            assert st["active"] == 5 - (s > LEAVE_AFTER) + (s >= first), (p.index, st)
    # During probation a validator recomputed the joiner's gradient every step (nobody was banned).
    assert all(not st["bans"] for p in run.peers for st in p.steps)
