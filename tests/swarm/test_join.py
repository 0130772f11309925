"""A late joiner enters a running swarm of real processes: admitted through a JOIN every member agrees on,
observes one step, checks the WELCOME state against the majority's commitments, serves its probation
(validated, not aggregated), then contributes; everyone finishes bit-identical."""

from __future__ import annotations

import pytest

from btard.swarm.launcher import PeerRole

from .conftest import run_swarm

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning"),
    pytest.mark.timeout(200),
]


def test_late_joiner_is_admitted_serves_probation_and_contributes(tmp_path):
    run = run_swarm(
        tmp_path,
        "join",
        peers=5,
        steps=30,
        validators=1,
        roles={4: PeerRole(label="late joiner", join_at_step=3)},
    )
    run.assert_honest_agree()
    members, joiner = run.peers[:4], run.peers[4]
    roles = [st["role"] for st in joiner.steps]
    assert roles[0] == "observer" and roles[1:3] == ["probation", "probation"], roles
    assert "contributor" in roles[3:], roles
    first = joiner.steps[0]["step"]
    assert 3 < first < 30 and joiner.steps[-1]["step"] == 29
    num, den = map(int, joiner.steps[0]["state_backers"].split("/"))
    assert 2 * num > den >= 3  # the WELCOME state is what the majority committed
    for p in members:
        by_step = {st["step"]: st for st in p.steps}
        assert by_step[first - 1]["next_active"] == 5 and by_step[first]["active"] == 5, p.index
        assert all(st["active"] == 4 for s, st in by_step.items() if s < first), p.index
    # During probation a validator recomputed the joiner's gradient every step (nobody was banned).
    assert all(not st["bans"] for p in run.peers for st in p.steps)
