"""Run n sans-IO peers over the in-memory network, step by step, with a simulated clock."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from btard.crypto import Identity
from btard.protocol.checks import ProjectionCache
from btard.protocol.messages import DecodeCache
from btard.protocol.peer import Behaviour, BtardPeer, GradientOracle, ProtocolConfig, Send, StepResult
from btard.protocol.state import Phase
from btard.transport.memory import MemoryNetwork


@dataclass
class Crash:
    """The peer goes silent (sends and receives nothing) once it reaches `phase` of step `step`."""

    step: int
    phase: Phase


@dataclass
class Harness:
    peers: dict[bytes, BtardPeer]
    network: MemoryNetwork
    crashes: dict[bytes, Crash] = field(default_factory=dict)
    now: float = 0.0
    max_events: int = 2_000_000
    on_send: Callable[[bytes, Send], None] | None = None

    def crashed(self, pid: bytes) -> bool:
        c = self.crashes.get(pid)
        if c is None:
            return False
        p = self.peers[pid]
        return p.step > c.step or (p.step == c.step and p.phase >= c.phase)

    def _flush(self, pid: bytes, results: dict[bytes, StepResult]) -> None:
        for ev in self.peers[pid].events():
            if isinstance(ev, StepResult):
                results[pid] = ev
            elif isinstance(ev, Send) and not self.crashed(pid):
                if self.on_send is not None:
                    self.on_send(pid, ev)
                self.network.send(pid, ev.dests, ev.raw, self.now)

    def run_step(
        self, gradients: Mapping[bytes, torch.Tensor | None], params_hash: bytes
    ) -> dict[bytes, StepResult]:
        """Run one step for every live peer; returns each finishing peer's StepResult.

        `gradients[p]` is p's gradient (None for validators). Peers that crash are simply not in the result.
        """
        results: dict[bytes, StepResult] = {}
        live = [pid for pid, p in self.peers.items() if not self.crashed(pid)]
        deadline: dict[bytes, float | None] = {}

        def touched(pid: bytes) -> None:
            self._flush(pid, results)
            waiting = pid not in results and not self.crashed(pid)
            deadline[pid] = self.peers[pid].next_deadline if waiting else None

        for pid in live:
            self.peers[pid].begin_step(self.now, params_hash, gradients.get(pid))
            touched(pid)
        for _ in range(self.max_events):
            if all(pid in results or self.crashed(pid) for pid in live):
                return results
            t_msg = self.network.next_time()
            pending = [d for d in deadline.values() if d is not None]
            t_dead = min(pending) if pending else None
            if t_msg is not None and (t_dead is None or t_msg <= t_dead):
                self.now, _src, dest, raw = self.network.pop()
                if dest in self.peers and not self.crashed(dest):
                    self.peers[dest].receive(raw, self.now)  # after its result: buffered for the next step
                    touched(dest)
            elif t_dead is not None:
                self.now = max(self.now, t_dead)
                for pid in live:
                    if deadline.get(pid) is not None:
                        self.peers[pid].tick(self.now)
                        touched(pid)
            else:
                raise RuntimeError("deadlock: no message in flight and no deadline pending")
        raise RuntimeError("step did not finish within max_events")


def build_peers(
    identities: Sequence[Identity],
    config: ProtocolConfig,
    *,
    oracle: GradientOracle | None,
    behaviours: Mapping[int, Behaviour] | None = None,
    seed: int = 0,
    audits: Mapping[bytes, Callable[[str, object], None]] | None = None,
) -> dict[bytes, BtardPeer]:
    """One peer per identity (index i gets ``behaviours[i]`` if given), sharing one projection cache and one
    decode cache (both pure functions of public bytes, so sharing only saves time), with reproducible MPRNG
    secrets."""
    ids = [i.peer_id for i in identities]
    cache = ProjectionCache()
    decoded = DecodeCache()
    behaviours = behaviours or {}
    audits = audits or {}
    return {
        ident.peer_id: BtardPeer(
            ident,
            config,
            ids,
            oracle=oracle,
            behaviour=behaviours.get(i),
            secret_source=seeded_secrets(seed, ident.peer_id),
            projection_cache=cache,
            decode_cache=decoded,
            audit=audits.get(ident.peer_id),
        )
        for i, ident in enumerate(identities)
    }


def seeded_secrets(seed: int, pid: bytes) -> Callable[[int], bytes]:
    """A deterministic MPRNG secret source for reproducible simulations (never use in a real swarm)."""
    import hashlib

    counter = [0]

    def source(n: int) -> bytes:
        counter[0] += 1
        return hashlib.blake2b(pid + seed.to_bytes(8, "little") + counter[0].to_bytes(8, "little")).digest()[
            :n
        ]

    return source
