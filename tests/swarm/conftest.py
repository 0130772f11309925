"""Helpers for swarm tests: real `btard peer` processes on loopback, driven by `LocalSwarm`."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from btard.swarm.launcher import LocalSwarm, PeerRun, SwarmConfig, summarize

from .blobs import TASK

ROOT = Path(__file__).resolve().parents[2]  # the peers import the test task from here

# Importing hivemind (through the transport) imports torch, whose jit deprecation warning is not ours.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")

# T = 1 s: a healthy step here takes ~0.1-0.3 s even on a loaded 2-core machine, so no honest message comes
# near the first deadline (T) let alone the second (2T); a crash costs a step of 14·T.
PHASE_TIMEOUT = 1.0


@dataclass
class SwarmRun:
    cfg: SwarmConfig
    peers: list[PeerRun]
    report: dict

    @property
    def honest(self) -> list[PeerRun]:
        return [p for p in self.peers if p.role.honest]

    def checkpoint_digests(self, step: int, peers: list[PeerRun] | None = None) -> set[str]:
        out = set()
        for p in peers or self.honest:
            state = json.loads((p.directory / "checkpoints" / f"step_{step:08d}" / "state.json").read_text())
            out.add(state["digest"])
        return out

    def assert_honest_agree(self) -> None:
        """Every honest peer finished, with bit-identical parameters and identical final checkpoints; no
        honest peer was banned or excluded; every honest audit log verifies."""
        for p in self.honest:
            assert p.returncode == 0, (
                p.index,
                p.returncode,
                (p.directory / "stderr.log").read_text()[-2000:],
            )
            assert p.done and p.done["status"] == "finished", p.done
        assert self.report["honest_identical"], self.report
        assert not self.report["honest_banned"], self.report["honest_banned"]
        honest_ids = {p.short for p in self.honest}
        for p in self.honest:
            for st in p.steps:
                assert not honest_ids & set(st["excluded"]), (p.index, st)
                assert not st["params_disagree"], (p.index, st)
            assert self.report["audit"][p.index]["ok"], self.report["audit"][p.index]
        assert len(self.checkpoint_digests(self.cfg.steps)) == 1


def swarm_config(root: Path, name: str, **overrides) -> SwarmConfig:
    """The test swarms' settings (the test task, T = 1 s, no validators, 3 steps, 4 peers) with overrides."""
    kw = dict(
        peers=4,
        task=TASK,
        steps=3,
        phase_timeout=PHASE_TIMEOUT,
        validators=0,
        run_dir=str(root / name),
        run_name=f"test-{name}",
        eval_final=False,
        timeout=150.0,
        env={"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
    )
    kw.update(overrides)
    return SwarmConfig(**kw)


def run_swarm(root: Path, name: str, **overrides) -> SwarmRun:
    cfg = swarm_config(root, name, **overrides)
    start = time.monotonic()
    with LocalSwarm(cfg) as swarm:
        peers = swarm.wait()
    return SwarmRun(cfg, peers, summarize(cfg, peers, time.monotonic() - start))
