from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pytest
import torch

from btard.crypto import Identity
from btard.protocol.audit import AuditLog
from btard.protocol.harness import Harness, build_peers
from btard.protocol.peer import Behaviour, ProtocolConfig
from btard.transport.memory import MemoryNetwork, NetworkFaults

RUN = b"test-run-0000000"


@dataclass
class Swarm:
    ids: list[bytes]
    harness: Harness
    grads: dict  # step -> {pid: gradient}
    cfg: ProtocolConfig
    honest: list[bytes]
    audits: dict

    def gradient(self, step: int, pid: bytes) -> torch.Tensor:
        """The 'true' gradient of a peer at a step: a deterministic function of (step, peer)."""
        seed = int.from_bytes(hashlib.blake2b(step.to_bytes(8, "little") + pid).digest()[:8], "little")
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.cfg.dim, generator=g) * 0.5 + torch.linspace(-1, 1, self.cfg.dim)

    def step(self, params_hash: bytes = b"p" * 32):
        peers = self.harness.peers
        any_peer = next(iter(peers.values()))
        t = any_peer.step
        grads = {
            pid: (None if p.is_validator or p.is_observer else self.gradient(t, pid))
            for pid, p in peers.items()
        }
        self.grads[t] = grads
        return self.harness.run_step(grads, params_hash)


def make_swarm(
    n: int,
    *,
    dim: int = 103,
    seed: int = 0,
    behaviours: dict[int, Behaviour] | None = None,
    faults: NetworkFaults | None = None,
    **cfg_kw,
) -> Swarm:
    behaviours = behaviours or {}
    idents = [Identity.from_seed(hashlib.sha256(f"peer{i}".encode()).digest()) for i in range(n)]
    ids = [i.peer_id for i in idents]
    cfg_kw.setdefault("validators", 0)
    cfg = ProtocolConfig(run_id=RUN, dim=dim, **cfg_kw)
    honest = [ids[i] for i in range(n) if i not in behaviours]
    swarm = Swarm(ids, None, {}, cfg, honest, {})  # type: ignore[arg-type]
    swarm.audits = {i.peer_id: AuditLog(i) for i in idents}
    peers = build_peers(
        idents, cfg, oracle=swarm.gradient, behaviours=behaviours, seed=seed, audits=swarm.audits
    )
    swarm.harness = Harness(peers, MemoryNetwork(seed, faults))
    return swarm


@pytest.fixture
def swarm_factory():
    return make_swarm
