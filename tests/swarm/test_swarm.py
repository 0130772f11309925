"""A real swarm: `btard peer` processes over libp2p on loopback, with crashes and Byzantine peers.

Every test checks the invariant of protocol.md §8: whatever one peer does (crash with kill -9 at any phase,
or misbehave), the honest peers complete every step and stay bit-identical, and nobody honest is banned.
"""

from __future__ import annotations

import json

import pytest

from btard.crypto import Identity
from btard.swarm.checkpoint import load_checkpoint
from btard.swarm.launcher import PeerRole

from .conftest import run_swarm

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning"),
    pytest.mark.timeout(200),
]


def test_permissioned_swarm_late_joiner_checkpoints_and_resume(tmp_path):
    """Four allow-listed peers (one validator per step) train; an outsider is never admitted; an allowed late
    joiner downloads x^t and the optimizer state and accepts them only because a majority of the members
    committed H(x^t). The members' checkpoints are identical, and the swarm resumes from them."""
    run_dir = tmp_path / "run"
    # The launcher uses peer-XX/identity.key if it exists: make the allowed keys first (members and joiner).
    allowed = [Identity.load_or_create(_key_dir(run_dir, i)).peer_id.hex() for i in (0, 1, 2, 3, 5)]
    allow_file = tmp_path / "allow.txt"
    allow_file.write_text("\n".join(allowed) + "\n")
    outsider = PeerRole(label="outsider (not allow-listed)", extra_args=["--join-timeout", "5"])
    first = run_swarm(
        tmp_path,
        "run",
        peers=6,
        min_peers=4,
        steps=6,
        validators=1,
        checkpoint_every=3,
        roles={4: outsider, 5: PeerRole(joiner=True)},
        extra_args=["--allow-list", str(allow_file)],
    )
    members, out, joiner = first.peers[:4], first.peers[4], first.peers[5]
    assert out.returncode == 1 and out.done is None, "the outsider must never receive a genesis"
    for p in members:
        assert p.returncode == 0 and p.done["status"] == "finished", (p.index, p.done)
        assert {st["active"] for st in p.steps} == {4}
    assert {p.done["params_hash"] for p in members} == {first.peers[0].done["params_hash"]}
    assert len(first.checkpoint_digests(3, members)) == 1 and len(first.checkpoint_digests(6, members)) == 1
    assert any(st["role"] == "validator" for p in members for st in p.steps)
    ckpt = load_checkpoint(members[0].directory)
    assert ckpt.step == 6 and ckpt.params_hash.hex() == members[0].done["params_hash"]

    assert joiner.returncode == 0 and joiner.done["status"] == "synced", joiner.done
    synced = load_checkpoint(joiner.directory)
    t = synced.step
    assert synced.params_hash.hex() == members[0].steps[t]["params_hash"]
    assert synced.members == tuple(sorted(bytes.fromhex(p.protocol_id) for p in members))

    # Resume the four members from their own step-6 checkpoints and train to step 9.
    resumed = run_swarm(tmp_path, "run", peers=4, steps=9, validators=1, resume=True)
    resumed.assert_honest_agree()
    for p in resumed.peers:
        assert p.steps[0]["step"] == 6 and p.steps[0]["params_hash"] == ckpt.params_hash.hex()
        lines = (p.directory / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == [*range(6), *range(6, 9)]


def _key_dir(run_dir, i):
    d = run_dir / f"peer-{i:02d}"
    d.mkdir(parents=True, exist_ok=True)
    return d / "identity.key"


# One swarm for the whole table (startup dominates a short run on 2 cores): five honest peers and one peer per
# row that kills itself with SIGKILL at that phase of step 1 (validators=0: every peer contributes and
# aggregates a part). Together they also show three simultaneous crashes costing a single slow step.
CRASHES = [
    ("before-commit", "commit"),  # dies before its GRAD_COMMIT leaves: a silent contributor
    ("aggregator-before-aggregating", "scatter"),  # committed, then dies holding everyone's part of its slice
    ("before-mprng-reveal", "mprng_reveal"),  # aggregated and committed its MPRNG secret, never reveals
]
CRASH_STEP, HONEST = 1, 5


@pytest.fixture(scope="module")
def crash_run(tmp_path_factory):
    roles = {HONEST + i: PeerRole(crash_at=f"{CRASH_STEP}:{phase}") for i, (_, phase) in enumerate(CRASHES)}
    return run_swarm(tmp_path_factory.mktemp("crash"), "crash", peers=HONEST + len(CRASHES), roles=roles)


def test_crashes_leave_honest_peers_identical(crash_run):
    crash_run.assert_honest_agree()
    for p in crash_run.honest:
        assert [st["active"] for st in p.steps] == [8, 8, 5], p.steps
        assert not p.steps[CRASH_STEP]["bans"]


@pytest.mark.parametrize("i,name", list(enumerate(c[0] for c in CRASHES)), ids=[c[0] for c in CRASHES])
def test_kill_9_mid_step(crash_run, i, name):
    victim = crash_run.peers[HONEST + i]
    assert victim.returncode == -9 and victim.crashed_at["step"] == CRASH_STEP
    assert victim.crashed_at["phase"] == CRASHES[i][1].upper()
    for p in crash_run.honest:
        assert victim.short in p.steps[CRASH_STEP]["excluded"], p.steps[CRASH_STEP]
    if name == "aggregator-before-aggregating":  # its slice of ĝ was never published (applied as zeros)
        assert crash_run.honest[0].steps[CRASH_STEP]["missing_parts"]


# One swarm for the table: six honest peers and one Byzantine process per row; row k attacks from step k + 1
# only, so each ban is attributable to one attack (validators=0: nobody sits a step out as validator).
ATTACKS = [
    ("commit-mismatch", {}, "commit-mismatch"),
    ("wrong-aggregate", {"scale": 0.05}, "fails the projection check"),
    ("false-accusation", {}, "false accusation"),
    ("equivocate-commit", {}, "equivocation"),
    ("mprng-alter", {}, "mprng-mismatch"),
]
ATTACK_HONEST = 6


@pytest.fixture(scope="module")
def attack_run(tmp_path_factory):
    roles = {
        ATTACK_HONEST + k: PeerRole(attack, params, attack_start=k + 1)
        for k, (attack, params, _) in enumerate(ATTACKS)
    }
    return run_swarm(
        tmp_path_factory.mktemp("attack"),
        "attack",
        peers=ATTACK_HONEST + len(ATTACKS),
        steps=len(ATTACKS) + 2,
        roles=roles,
    )


def test_attacks_leave_honest_peers_identical(attack_run):
    attack_run.assert_honest_agree()
    for p in attack_run.honest:
        assert [st["active"] for st in p.steps] == [11, 11, 10, 9, 8, 7, 6], p.steps


@pytest.mark.parametrize(
    "k,attack,verdict", [(k, a, v) for k, (a, _, v) in enumerate(ATTACKS)], ids=[a[0] for a in ATTACKS]
)
def test_byzantine_process_is_banned(attack_run, k, attack, verdict):
    """(What the attacker's own process concludes is its business: only the honest peers' verdicts count.)"""
    attacker = attack_run.peers[ATTACK_HONEST + k]
    for p in attack_run.honest:
        bans = {b["peer"]: b for st in p.steps for b in st["bans"]}
        assert verdict in bans[attacker.short]["reason"], bans
        step_bans = p.steps[k + 1]["bans"]
        assert [b["peer"] for b in step_bans] == [attacker.short], step_bans
