"""A real swarm across network interfaces: each `btard peer` runs in its own network namespace, plugged into a
Linux bridge by a veth pair (`btard.swarm.netns.NetnsLan`), listening only on its LAN address.

1. The peers train and end bit-identical; their traffic went through the veths (byte counters grow).
2. One non-bootstrap host's cable is pulled mid-run: the others exclude the silent peer, finish every step,
   end bit-identical, and nobody is banned.
"""

from __future__ import annotations

import time

import pytest

from btard.swarm.launcher import LocalSwarm, PeerRole, PeerRun, summarize
from btard.swarm.netns import NetnsLan, missing_capability

from .blobs import blobs_task
from .conftest import SwarmRun, swarm_config

_missing = missing_capability()
if _missing:
    pytest.skip(f"network namespaces unavailable: {_missing}", allow_module_level=True)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning"),
    pytest.mark.timeout(150),
]

HOSTS = 4
GRADIENT_BYTES = 4 * blobs_task().dim  # float32


@pytest.fixture
def lan():
    """Four hosts on one switch; the namespaces, veths and bridge are deleted even if the test fails."""
    with NetnsLan(HOSTS) as lan:
        yield lan


def _run(lan: NetnsLan, root, name: str, steps: int, cutter: CutMidRun | None = None) -> SwarmRun:
    """Peer i runs in host i's namespace and listens on host i's address only; peer 0 bootstraps the others
    (the launcher hands them its multiaddr, which is therefore on the LAN)."""
    roles = {
        i: PeerRole(
            label=f"host {i} ({lan.address(i)})",
            exec_prefix=lan.exec_prefix(i),
            extra_args=["--host-maddrs", f"/ip4/{lan.address(i)}/tcp/0"],
        )
        for i in range(HOSTS)
    }
    cfg = swarm_config(root, name, peers=HOSTS, roles=roles, steps=steps, timeout=120.0)
    start = time.monotonic()
    swarm = LocalSwarm(cfg, on_event=cutter)
    if cutter is not None:
        cutter.swarm = swarm  # before any event: they are handled in start() and wait()
    with swarm:
        peers = swarm.wait()
    return SwarmRun(cfg, peers, summarize(cfg, peers, time.monotonic() - start))


def _assert_on_lan(lan: NetnsLan, peers: list[PeerRun]) -> None:
    for p in peers:
        maddrs = p.info["maddrs"]
        assert maddrs and all(m.startswith(f"/ip4/{lan.address(p.index)}/tcp/") for m in maddrs), maddrs


def test_peers_in_namespaces_train_identically_over_veths(lan, tmp_path):
    before = [(lan.counters(i), lan.counters(i, "lo")) for i in range(HOSTS)]
    steps = 3
    run = _run(lan, tmp_path, "lan", steps)
    run.assert_honest_agree()
    _assert_on_lan(lan, run.peers)
    for p in run.peers:
        assert [st["active"] for st in p.steps] == [HOSTS] * steps, p.steps
    # Every step each peer (all contribute and aggregate: validators=0) receives the others' parts of its
    # slice of the gradient and the others' slices of ĝ: 2·(n-1)/n of a gradient, and sends as much. At least
    # that crossed each host's veth; loopback carried not even one gradient's worth.
    need = _exchange_bytes(steps, HOSTS)
    for i, (eth, lo) in enumerate(before):
        after, lo_after = lan.counters(i), lan.counters(i, "lo")
        assert after["rx_bytes"] - eth["rx_bytes"] >= need, (i, eth, after, need)
        assert after["tx_bytes"] - eth["tx_bytes"] >= need, (i, eth, after, need)
        assert lo_after["rx_bytes"] - lo["rx_bytes"] < GRADIENT_BYTES, (i, lo, lo_after)


def _exchange_bytes(steps: int, n: int) -> int:
    """What each of ``n`` peers receives at least in ``steps`` steps: 2·(n-1)/n of a gradient per step."""
    return steps * 2 * GRADIENT_BYTES * (n - 1) // n


class CutMidRun:
    """``on_event`` of the launcher: once peer 0 reports step ``after`` done, cut ``victim`` off; once every
    other peer has exited, kill the victim (it cannot tell it was cut off and may wait for the others)."""

    def __init__(self, lan: NetnsLan, victim: int, after: int) -> None:
        self.lan, self.victim, self.after = lan, victim, after
        self.swarm: LocalSwarm | None = None
        self.cut_at: float | None = None
        self.victim_counters: dict[str, int] = {}
        self.others_at_cut: dict[int, dict[str, int]] = {}
        self.step_seen: dict[tuple[int, int], float] = {}  # (peer, step) -> when its step event arrived

    def __call__(self, run: PeerRun, ev: dict) -> None:
        assert self.swarm is not None
        if ev["event"] == "step":
            self.step_seen[run.index, ev["step"]] = time.monotonic()
        if self.cut_at is None and run.index == 0 and ev["event"] == "step" and ev["step"] >= self.after:
            self.lan.cut(self.victim)
            self.cut_at = time.monotonic()
            self.victim_counters = self.lan.counters(self.victim)
            self.others_at_cut = {i: self.lan.counters(i) for i in range(HOSTS) if i != self.victim}
        victim = self.swarm.peers[self.victim]
        others_gone = all(r.returncode is not None for r in self.swarm.peers if r is not victim)
        if ev["event"] == "exit" and others_gone and victim.returncode is None:
            victim.process.kill()


def test_cut_host_is_excluded_and_the_rest_finish(lan, tmp_path):
    steps, victim, after = 6, 2, 1  # cut once peer 0 has finished step 1 (0-based): mid-run
    cutter = CutMidRun(lan, victim, after)
    run = _run(lan, tmp_path, "cut", steps, cutter)
    assert cutter.cut_at is not None, "peer 0 never reached the cut step"
    _assert_on_lan(lan, run.peers)
    rest = [p for p in run.peers if p.index != victim]
    cut_peer = run.peers[victim]
    rest_ids = {p.short for p in rest}

    for p in rest:
        assert p.returncode == 0, (p.index, p.returncode, (p.directory / "stderr.log").read_text()[-2000:])
        assert p.done and p.done["status"] == "finished" and p.done["step"] == steps, p.done
        assert [st["step"] for st in p.steps] == list(range(steps)), p.steps
        for st in p.steps:
            # A silent peer is excluded, never banned; and nobody else is banned either.
            assert not st["bans"], (p.index, st)
            assert not rest_ids & set(st["excluded"]), (p.index, st)
            assert not st["params_disagree"], (p.index, st)
        assert run.report["audit"][p.index]["ok"], run.report["audit"][p.index]
    assert len({p.done["params_hash"] for p in rest}) == 1
    assert len(run.checkpoint_digests(steps, rest)) == 1

    # Every remaining peer excluded the victim in the same step, after the step peer 0 had finished, and trained on
    # with the three of them.
    excluded_at = {p.index: [st["step"] for st in p.steps if cut_peer.short in st["excluded"]] for p in rest}
    s = excluded_at[rest[0].index][0] if excluded_at[rest[0].index] else None
    assert s is not None and all(v == [s] for v in excluded_at.values()), excluded_at
    assert after < s < steps, (s, after)  # peer 0 had finished step `after` with the victim
    for p in rest:
        assert [st["active"] for st in p.steps] == [HOSTS] * (s + 1) + [HOSTS - 1] * (steps - s - 1), p.steps

    # The victim never claims success: it sees itself partitioned (it lost at least half of the members in one
    # step) and stops, or it is still waiting in a step when the others are done (then the test kills it).
    assert cut_peer.done is None or cut_peer.done["status"] == "partitioned", cut_peer.done

    # The cut was real: nothing reached the victim's interface afterwards, while the others kept exchanging.
    assert lan.counters(victim)["rx_bytes"] == cutter.victim_counters["rx_bytes"]
    need = _exchange_bytes(steps - s - 1, HOSTS - 1)
    for i, at_cut in cutter.others_at_cut.items():
        assert lan.counters(i)["rx_bytes"] - at_cut["rx_bytes"] >= need, (i, at_cut, need)

    witness = rest[0]
    t_excluded = cutter.step_seen[witness.index, s] - cutter.cut_at
    print(
        f"\ncut host {victim} after peer 0's step {after}; excluded in step {s} "
        f"({witness.steps[s]['step_seconds']:.2f} s, deadlines hit {witness.steps[s]['deadlines_hit']}, "
        f"phases {witness.steps[s]['phases']}), {t_excluded:.2f} s after the cut; "
        f"victim: exit {cut_peer.returncode}, done {cut_peer.done}, {len(cut_peer.steps)} steps; "
        f"step seconds {[st['step_seconds'] for st in witness.steps]}; wall {run.report['wall_seconds']} s"
    )
