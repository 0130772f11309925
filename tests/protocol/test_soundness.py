"""Soundness of the checks (issue 11): no Byzantine message crashes a peer, switches a check off or owns a step.

A table of (attack, expected outcome) against the real state machine; every row also requires that honest peers
agree, that no honest peer is banned and that nothing raises.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from btard.protocol.peer import Behaviour, BtardPeer

from .conftest import make_swarm

N = 7


class ShortKProj(Behaviour):
    """A PROJ with one projection per part instead of K (crashed every honest peer before)."""

    def projections(self, peer: BtardPeer, norms: np.ndarray, projs: np.ndarray):
        return norms, projs[:, :1]


class OneRowProj(Behaviour):
    """A PROJ with a single row (it used to exempt every part from its checks)."""

    def projections(self, peer: BtardPeer, norms: np.ndarray, projs: np.ndarray):
        return norms[:1], projs[:1]


class Identical(Behaviour):
    """Every Byzantine peer sends the same vector B (identical rows drove the adaptive τ to 0 before)."""

    def gradient(self, peer: BtardPeer, g: torch.Tensor) -> torch.Tensor:
        return torch.full_like(g, 5.0)


class Huge(Behaviour):
    """A finite gradient of enormous magnitude (its squared distances overflow float32)."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def gradient(self, peer: BtardPeer, g: torch.Tensor) -> torch.Tensor:
        return torch.full_like(g, self.scale)


@dataclass(frozen=True)
class Expect:
    banned: str | None = None  # a substring of the attacker's verdict reason
    excluded: bool = False
    applied_all: bool = False  # every part applied in the attack step


TABLE = [
    ("short-k-proj", {5: ShortKProj()}, Expect(banned="bad-shape")),
    ("one-row-proj", {5: OneRowProj()}, Expect(banned="bad-shape")),
    ("identical-vectors", {4: Identical(), 5: Identical()}, Expect(applied_all=True)),
    ("huge-finite-1e25", {5: Huge(1e25)}, Expect(applied_all=True)),
    ("huge-finite-3e38", {5: Huge(3e38)}, Expect(applied_all=True)),
]


@pytest.mark.parametrize("name,behaviours,expect", TABLE, ids=[t[0] for t in TABLE])
def test_soundness_row(name, behaviours, expect):
    swarm = make_swarm(N, seed=3, behaviours=behaviours, validators=0)
    attackers = [swarm.ids[i] for i in behaviours]
    res = swarm.step()
    honest = [res[p] for p in swarm.honest]
    first = honest[0]
    for r in honest:
        assert torch.equal(r.aggregate, first.aggregate) and r.verdicts == first.verdicts
        assert r.next_members == first.next_members and r.excluded == first.excluded
    assert torch.isfinite(first.aggregate).all()
    assert not {v.banned for v in first.verdicts} & set(swarm.honest), [v.describe() for v in first.verdicts]
    assert not set(first.excluded) & set(swarm.honest)
    if expect.banned:
        reasons = [v.reason for v in first.verdicts if v.banned in attackers]
        assert reasons and all(expect.banned in x for x in reasons), [v.describe() for v in first.verdicts]
    if expect.applied_all:
        assert not first.failed_parts and not first.missing_parts and not first.unapplied_parts
    if name == "identical-vectors":
        # 2 identical rows among 7 cannot own any part: the aggregate is not B anywhere
        assert not torch.isclose(first.aggregate, torch.full_like(first.aggregate, 5.0)).any()


def test_a_withheld_report_never_exempts_a_part():
    """A silent reporter is excluded and the parts it should have reported on are not applied unchecked."""

    class Silent(Behaviour):
        def projections(self, peer, norms, projs):
            return norms, projs

    swarm = make_swarm(N, seed=4, behaviours={5: Silent()}, validators=0)
    liar = swarm.harness.peers[swarm.ids[5]]
    orig = liar._send_projections
    liar._send_projections = lambda: None  # commits, scatters and aggregates, then reports nothing
    res = swarm.step()
    liar._send_projections = orig
    first = res[swarm.honest[0]]
    assert swarm.ids[5] in first.excluded
    applied = [j for j in range(N) if j not in first.unapplied_parts]
    assert not applied, "a part was applied without the silent peer's report"
    assert all(res[p].unapplied_parts == first.unapplied_parts for p in swarm.honest)
    assert not any(v.banned in swarm.honest for v in first.verdicts)


def test_proj_shape_is_checked_at_receipt():
    """The malformed PROJ is evidence: it is in the honest peers' audit logs and the verdict cites it."""
    swarm = make_swarm(N, seed=5, behaviours={5: ShortKProj()}, validators=0)
    res = swarm.step()
    first = res[swarm.honest[0]]
    v = [v for v in first.verdicts if v.banned == swarm.ids[5]]
    assert v and v[0].reason == "bad-shape" and v[0].accuser in swarm.honest


class _Flip(Behaviour):
    def __init__(self, k: float) -> None:
        self.k = k

    def gradient(self, peer: BtardPeer, g: torch.Tensor) -> torch.Tensor:
        return -self.k * g


@pytest.mark.parametrize("k", [10.0, 1000.0])
@pytest.mark.parametrize("b", [1, 3])
def test_a_minority_of_gradient_attackers_cannot_stall_a_part(b, k):
    """The scale check fails a part without a ban: it must not be a lever. A Byzantine minority sending
    sign-flipped gradients (×10, ×1000) leaves every part applied, for several seeds."""
    n = 2 * b + 2
    for seed in range(2):
        swarm = make_swarm(n, seed=seed, dim=256, behaviours={n - 1 - i: _Flip(k) for i in range(b)})
        r = swarm.step()[swarm.honest[0]]
        assert not r.unapplied_parts and not r.failed_parts and not r.missing_parts
        assert not {v.banned for v in r.verdicts} & set(swarm.honest)
