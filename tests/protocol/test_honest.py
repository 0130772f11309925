"""Honest runs: ĝ is CenteredClip part by part, every honest peer agrees, delivery order does not matter."""

from __future__ import annotations

import pytest
import torch

from btard.aggregation import centered_clip
from btard.protocol.checks import part_bounds, part_order
from btard.transport.memory import NetworkFaults

from .conftest import make_swarm


def expected_aggregate(swarm, step, result):
    contributors = [p for p in result.members if swarm.grads[step][p] is not None]
    x = torch.stack([swarm.grads[step][p] for p in contributors])
    out = torch.empty(swarm.cfg.dim)
    for a, b in part_bounds(swarm.cfg.dim, len(contributors)):
        out[a:b] = centered_clip(x[:, a:b], swarm.cfg.tau, lam=swarm.cfg.lam, eps_rel=swarm.cfg.eps_rel).value
    return out


@pytest.mark.parametrize("n", [2, 3, 4, 8, 16])
def test_honest_peers_agree_and_match_centered_clip(n):
    swarm = make_swarm(n, seed=n, validators=1)
    for _ in range(3):
        res = swarm.step()
        assert set(res) == set(swarm.ids)
        first = res[swarm.ids[0]]
        step = first.step
        for r in res.values():
            assert torch.equal(r.aggregate, first.aggregate)
            assert r.r == first.r and r.next_members == first.next_members
            assert r.next_validators == first.next_validators
            assert r.verdicts == () and r.excluded == () and r.failed_parts == ()
        assert torch.allclose(first.aggregate, expected_aggregate(swarm, step, first), atol=1e-6)


def test_result_independent_of_delivery_order():
    outs = []
    for seed in range(3):
        swarm = make_swarm(5, seed=0, validators=1)
        swarm.harness.network._rng.seed(100 + seed)  # only the schedule changes
        swarm.harness.network.faults = NetworkFaults(max_delay=0.5)
        res = [swarm.step() for _ in range(2)]
        outs.append([(r[swarm.ids[0]].aggregate, r[swarm.ids[0]].r) for r in res])
    for o in outs[1:]:
        for (a, r), (a0, r0) in zip(o, outs[0]):
            assert torch.equal(a, a0) and r == r0


def test_dropped_and_duplicated_messages_are_recovered():
    swarm = make_swarm(6, seed=1, faults=NetworkFaults(max_delay=0.05, drop_prob=0.05, duplicate_prob=0.1))
    for _ in range(3):
        res = swarm.step()
        vals = list(res.values())
        assert len(vals) == 6
        assert all(torch.equal(v.aggregate, vals[0].aggregate) for v in vals)
        assert all(v.verdicts == () and v.excluded == () for v in vals)


def test_part_order_is_a_deterministic_shuffle():
    ids = [bytes([i]) * 32 for i in range(8)]
    assert part_order(ids, b"a") == part_order(list(reversed(ids)), b"a")
    assert part_order(ids, b"a") != part_order(ids, b"b")


def test_check_cache_gives_the_checks_results():
    import numpy as np

    from btard.protocol import checks

    rng = np.random.default_rng(0)
    cache = checks.CheckCache(max_entries=8)
    for i in range(40):
        m = int(rng.integers(1, 9))
        norms, projs = np.abs(rng.normal(size=m)), rng.normal(size=(m, 4)) * (1 if i % 3 else 10)
        trusted = rng.random(m) < 0.3 if i % 2 else None
        kw = dict(tau="adaptive" if i % 4 else 0.5, lam=1.0, eps_rel=1e-4, plausibility=8.0, trusted=trusted)
        for _ in range(2):  # a miss, then a hit
            assert cache.fixed_point_check(norms, projs, **kw) == checks.fixed_point_check(norms, projs, **kw)
            assert cache.scale_ratio(norms, projs) == checks.scale_ratio(norms, projs)


def test_faulty_network_run_does_not_depend_on_the_hash_seed():
    """A simulation is a function of its seed: no set iteration order (which varies with PYTHONHASHSEED)
    may reach what a peer sends, even when lost messages are pulled again."""
    import os
    import subprocess
    import sys

    code = (
        "import hashlib\n"
        "from tests.protocol.conftest import make_swarm\n"
        "from btard.transport.memory import NetworkFaults\n"
        "sw = make_swarm(6, dim=61, seed=5, faults=NetworkFaults(drop_prob=0.2, max_delay=3.0), validators=1)\n"
        "h = hashlib.sha256()\n"
        "for _ in range(2):\n"
        "    for pid, r in sorted(sw.step().items()):\n"
        "        h.update(pid + r.aggregate.numpy().tobytes() + r.r + repr((r.excluded, r.missing_parts)).encode())\n"
        "print(h.hexdigest(), sw.harness.network.sent_messages, sw.harness.now)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    outs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        run = subprocess.run(
            [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, run.stderr[-2000:]
        outs.add(run.stdout)
    assert len(outs) == 1, outs
