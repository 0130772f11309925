"""Phase timeouts derived from measured phase times: agreed by every member (from the signed MPRNG commits),
never below the configured floor, growing at most 2× per step, and not movable by a minority."""

from __future__ import annotations

from tests.protocol.conftest import make_swarm


def steps_with_hints(swarm, hints: dict[bytes, float], n: int) -> list[set[float]]:
    out = []
    for _ in range(n):
        for pid, seconds in hints.items():
            swarm.harness.peers[pid].report_phase_time(seconds)
        res = swarm.step()
        assert all(not r.verdicts and not r.excluded for r in res.values())
        out.append({r.next_phase_timeout for r in res.values()})
    return out


def test_timeout_follows_the_median_of_reported_phase_times_with_a_floor_and_bounded_growth():
    swarm = make_swarm(5, dim=64, phase_timeout=2.0)
    assert steps_with_hints(swarm, {}, 1) == [{2.0}]  # nothing reported: the floor
    hints = dict.fromkeys(swarm.ids, 1.5)  # slowest phase 1.5 s: wants 4 × 1.5 = 6 s
    assert steps_with_hints(swarm, hints, 2) == [{4.0}, {6.0}]  # at most 2× per step
    assert all(p.phase_timeout == 6.0 for p in swarm.harness.peers.values())
    assert steps_with_hints(swarm, dict.fromkeys(swarm.ids, 0.1), 1) == [
        {2.0}
    ]  # fast again: back to the floor


def test_a_minority_reporting_absurd_phase_times_does_not_move_the_timeout():
    swarm = make_swarm(5, dim=64, phase_timeout=2.0)
    hints = dict.fromkeys(swarm.ids, 0.2)
    for liar in swarm.ids[:2]:
        hints[liar] = 3000.0
    assert steps_with_hints(swarm, hints, 3) == [{2.0}] * 3
