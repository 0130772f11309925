"""Issue 10's real-process reproduction: one late signed message must never split the honest peers.

Five `btard peer` processes (MNIST, T = 1 s, no validators); one is Byzantine (`btard.attacks.late_part:LatePart`)
and, at step 1, about 0.1 s into the step (when it enters AGGREGATE, well before ACCUSE), sends ONE extra signed
GRAD_PART for the current step (a second version of a part it already sent: same (sender, part) slot, different
data) to ONE honest peer that is not that part's aggregator. Whatever the honest peers conclude about it (banned
by all of them at the same step, or by none), they must conclude the same: the same membership and verdicts step
by step, bit-identical parameters, no honest peer banned, none stopped as `partitioned`.
"""

from __future__ import annotations

import re

import pytest

from btard.swarm.launcher import PeerRole

from .conftest import run_swarm

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning"),
    pytest.mark.timeout(240),
]

ATTACK = "btard.attacks.late_part:LatePart"
HONEST, ATTACK_STEP, STEPS = 4, 1, 4
SENT = re.compile(r"late-part: step (\d+) part (\d+) aggregator ([0-9a-f]+) target ([0-9a-f]+)")


def test_one_late_part_to_one_honest_peer_does_not_split_the_honest_peers(tmp_path):
    run = run_swarm(
        tmp_path,
        "late",
        peers=HONEST + 1,
        task="mnist",
        steps=STEPS,
        roles={HONEST: PeerRole(ATTACK, attack_start=ATTACK_STEP)},
    )
    attacker = run.peers[HONEST]
    by_id = {p.protocol_id: p for p in run.peers}

    # The attack fired once, at step 1, to one honest peer that does not aggregate that part.
    sent = SENT.findall((attacker.directory / "stderr.log").read_text())
    assert len(sent) == 1, sent
    step, _part, aggregator, target = sent[0]
    assert int(step) == ATTACK_STEP
    assert target != aggregator and by_id[target].role.honest and by_id[aggregator].role.honest

    # Every honest peer took the same decisions, step by step (the Byzantine peer banned by all or by none).
    views = {
        p.index: [
            (
                st["step"],
                st["active"],
                st["next_active"],
                sorted(b["peer"] for b in st["bans"]),
                sorted(st["excluded"]),
                st["params_hash"][:8],
            )
            for st in p.steps
        ]
        for p in run.honest
    }
    statuses = {p.index: (p.done or {}).get("status", f"exit {p.returncode}") for p in run.honest}
    if len({repr(v) for v in views.values()}) != 1 or "partitioned" in statuses.values():
        table = "\n".join(f"  peer {i} ({statuses[i]}): {v}" for i, v in views.items())
        pytest.fail(
            f"honest peers split after one late GRAD_PART (attacker peer {attacker.index} = {attacker.short}, "
            f"sent to peer {by_id[target].index}, aggregator peer {by_id[aggregator].index}); "
            f"(step, active, next_active, bans, excluded, params) per honest peer:\n{table}",
            pytrace=False,
        )
    run.assert_honest_agree()
    assert [st["step"] for st in run.honest[0].steps] == list(range(STEPS))
