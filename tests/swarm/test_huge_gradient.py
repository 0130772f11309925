"""Issue 11's crash case in a real swarm: one Byzantine peer sends a finite but huge gradient.

Five `btard peer` processes (MNIST, T = 1 s, two validators per step, 8 steps); one is Byzantine and runs the
gradient attack sign-flip, v = −k·g, from step 0 on, with k = 1e25 (the issue's reproduction: squared distances
overflow float32, which once made `centered_clip` raise in every honest aggregator, so that every honest peer
exited 1 or stopped as partitioned) and k = 1e37 (coordinates up to ~1e37: finite float32 values within a
factor ~30 of its largest, whose squares overflow it by ~35 orders of magnitude).

What must hold whatever the attacker sends:
- every honest peer finishes (exit 0, status "finished", never "partitioned"), nobody honest is banned or
  excluded, and the honest peers agree step by step (membership, verdicts, validators, parameters, checkpoints);
- the parameters stay finite and move by no more than an honest step's worth in every step, so the attacker's
  vector was clipped by CenteredClip (applied unclipped, it would move them by ~lr·k/n ≈ 1e22 or more);
- the attacker is banned ("validation") at exactly the first step in which an honest validator targets it, and
  not before. Validators and their targets are drawn from the step's shared random r, which no one controls, so
  whether that happens within the 8 steps is chance (roughly 4 runs in 5, by a rough estimate); a run in which
  the attacker is never targeted must show it not banned and clipped in every step.
"""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import pytest

from btard.protocol.messages import Kind, decode
from btard.swarm.launcher import PeerRole

from .conftest import run_swarm

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning"),
    pytest.mark.timeout(240),
]

HONEST, STEPS, VALIDATORS = 4, 8, 2
# Honest MNIST steps here move x by ~0.07–0.12 (lr 0.05, momentum); the bound leaves room for that and nothing
# near an unclipped attacker (‖Δx‖ ≥ 1e20).
MAX_STEP_MOVE = 1.0
MAX_ABS_PARAM = 10.0  # initial weights are within ±0.2


def _begin_records(peer) -> dict[int, dict]:
    """Each step's prior state as the peer logged it (members, validators: validator -> target)."""
    out = {}
    for line in (peer.directory / "audit.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("t") == "begin":
            out[rec["step"]] = rec
    return out


def _proj_norms(peer, sender: str) -> dict[int, float]:
    """Step -> the largest distance n^j in `sender`'s signed PROJ of that step, from `peer`'s audit log."""
    out = {}
    for line in (peer.directory / "audit.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "raw" not in rec:
            continue
        msg = decode(base64.b64decode(rec["raw"])).msg
        if msg.kind == Kind.PROJ and msg.sender.hex() == sender:
            out[msg.step] = float(np.abs(np.asarray(msg.norms, dtype=np.float64)).max())
    return out


@pytest.mark.parametrize("k", [1e25, 1e37], ids=["k=1e25", "k=1e37"])
def test_one_huge_finite_gradient_is_clipped_or_banned_and_crashes_no_one(tmp_path, k):
    run = run_swarm(
        tmp_path,
        "huge",
        peers=HONEST + 1,
        task="mnist",
        steps=STEPS,
        validators=VALIDATORS,
        checkpoint_every=1,
        roles={HONEST: PeerRole("sign-flip", {"k": k}, attack_start=0)},
    )
    attacker = run.peers[HONEST]
    by_id = {p.protocol_id: p for p in run.peers}

    # Every honest peer ran every step and took the same decisions (a split or a crash shows here first).
    views = {
        p.index: [
            (
                st["step"],
                st["active"],
                st["next_active"],
                sorted((b["peer"], b["reason"]) for b in st["bans"]),
                sorted(st["excluded"]),
                st["params_hash"][:8],
            )
            for st in p.steps
        ]
        for p in run.honest
    }
    statuses = {p.index: (p.done or {}).get("status", f"exit {p.returncode}") for p in run.honest}
    if len({repr(v) for v in views.values()}) != 1 or set(statuses.values()) != {"finished"}:
        table = "\n".join(f"  peer {i} ({statuses[i]}): {v}" for i, v in views.items())
        pytest.fail(
            f"honest peers crashed or split under sign-flip k={k:g} (attacker peer {attacker.index} = "
            f"{attacker.short}); (step, active, next_active, bans, excluded, params) per honest peer:\n{table}",
            pytrace=False,
        )
    run.assert_honest_agree()
    for p in run.honest:
        assert [st["step"] for st in p.steps] == list(range(STEPS)), p.steps
        assert all(math.isfinite(st["loss"]) for st in p.steps), [st["loss"] for st in p.steps]
    for t in range(1, STEPS + 1):  # every step's checkpoint, not only the last
        assert len(run.checkpoint_digests(t)) == 1, t

    # The attack fired: in every step it contributed to, the attacker's signed PROJ (as an honest peer logged it)
    # reports distances ‖v[j] − ĝ[j]‖ of the attack's size, far beyond an honest gradient's (~1).
    witness = run.honest[0]
    sizes = _proj_norms(witness, attacker.protocol_id)
    assert 0 in sizes and min(sizes.values()) > k * 1e-6, sizes

    # Parameters finite and moved by an honest step's worth at most: the huge vector was clipped.
    prev = None
    for t in range(1, STEPS + 1):
        x = np.load(witness.directory / "checkpoints" / f"step_{t:08d}" / "params.npy")
        assert np.isfinite(x).all(), t
        assert float(np.abs(x).max()) < MAX_ABS_PARAM, (t, float(np.abs(x).max()))
        if prev is not None:
            move = float(np.linalg.norm(x.astype(np.float64) - prev))
            assert move < MAX_STEP_MOVE, (t, move)
        prev = x.astype(np.float64)

    # Validators (and their targets) are the same at every honest peer; the attacker is banned for its gradient
    # exactly when an honest validator first checks it, by every honest peer, and never before.
    begins = {p.index: _begin_records(p) for p in run.honest}
    validators = {s: begins[witness.index][s]["validators"] for s in range(STEPS)}
    for p in run.honest:
        assert {s: begins[p.index][s]["validators"] for s in range(STEPS)} == validators, p.index
    checked_at = next(
        (
            s
            for s in range(1, STEPS)
            if any(t == attacker.protocol_id and by_id[v].role.honest for v, t in validators[s].items())
        ),
        None,
    )
    for p in run.honest:
        bans = [(st["step"], b) for st in p.steps for b in st["bans"]]
        assert all(b["peer"] == attacker.short for _, b in bans), bans
        if checked_at is None:
            assert not bans, bans
        else:
            assert len(bans) == 1 and bans[0][0] == checked_at, (checked_at, bans)
            assert "validation" in bans[0][1]["reason"], bans
            assert [st["active"] for st in p.steps] == [HONEST + 1] * (checked_at + 1) + [HONEST] * (
                STEPS - checked_at - 1
            ), p.steps
    print(
        f"sign-flip k={k:g}: attacker {attacker.short} "
        + (f"banned at step {checked_at} (validation)" if checked_at is not None else "never validated")
        + f"; swarm {run.report['wall_seconds']} s, median step {run.report['step_seconds_median']} s"
    )
