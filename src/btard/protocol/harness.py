"""Run n sans-IO peers over the in-memory network, step by step, with a simulated clock."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from btard.crypto import Identity
from btard.protocol.checks import CheckCache, ProjectionCache
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
        events = self.peers[pid].events()
        if not events:
            return
        silent = self.crashed(pid)  # the peer's state does not change while its events are flushed
        for ev in events:
            if isinstance(ev, StepResult):
                results[pid] = ev
            elif isinstance(ev, Send) and not silent:
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
        peers, network = self.peers, self.network
        live = [pid for pid, p in peers.items() if not self.crashed(pid)]
        # A peer's result, crash and deadline change only when it runs, so each is updated in `touched`:
        # `waiting` holds the live peers without a result that have not crashed, `deadline` the pending
        # deadlines, `earliest` their minimum (None: recompute).
        waiting = set(live)
        deadline: dict[bytes, float] = {}
        earliest: list[float | None] = [None]

        def touched(pid: bytes) -> None:
            self._flush(pid, results)
            new = None
            if pid in results or self.crashed(pid):
                waiting.discard(pid)
            else:
                new = peers[pid].next_deadline
            old = deadline.pop(pid, None)
            if new is not None:
                deadline[pid] = new
            t = earliest[0]
            if old is not None and old == t and (new is None or new > old):
                earliest[0] = None  # the minimum may have moved up
            elif new is not None and t is not None and new < t:
                earliest[0] = new

        for pid in live:
            peers[pid].begin_step(self.now, params_hash, gradients.get(pid))
            touched(pid)
        for _ in range(self.max_events):
            if not waiting:
                return results
            t_msg = network.next_time()
            if earliest[0] is None and deadline:
                earliest[0] = min(deadline.values())
            t_dead = earliest[0] if deadline else None
            if t_msg is not None and (t_dead is None or t_msg <= t_dead):
                self.now, _src, dest, raw = network.pop()
                if dest in peers and not self.crashed(dest):
                    peers[dest].receive(raw, self.now)  # after its result: buffered for the next step
                    touched(dest)
            elif t_dead is not None:
                self.now = max(self.now, t_dead)
                for pid in live:
                    if pid in deadline:
                        peers[pid].tick(self.now)
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
    """One peer per identity (index i gets ``behaviours[i]`` if given), sharing one projection cache, one
    decode cache and one check cache (all memos of pure functions of public bytes, so sharing only saves
    time: every peer still receives, verifies and checks everything itself), with reproducible MPRNG
    secrets."""
    ids = [i.peer_id for i in identities]
    cache = ProjectionCache()
    decoded = DecodeCache()
    checked = CheckCache()
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
            check_cache=checked,
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
