"""In-memory transport with a seeded scheduler: random delivery order and injectable drops, delays and
duplicates. Used by the simulator and the protocol tests; the same seed gives the same schedule."""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class NetworkFaults:
    """What the network does to messages between honest peers (applied independently per delivery)."""

    max_delay: float = 0.01
    drop_prob: float = 0.0
    duplicate_prob: float = 0.0
    # sender id -> the set of receivers that never get its messages (a targeted partition)
    blocked: dict[bytes, frozenset[bytes]] = field(default_factory=dict)


class MemoryNetwork:
    """A priority queue of (delivery time, sequence, destination, bytes). Bytes are never shared mutable."""

    def __init__(self, seed: int = 0, faults: NetworkFaults | None = None) -> None:
        self._rng = random.Random(seed)
        self.faults = faults or NetworkFaults()
        self._queue: list[tuple[float, int, bytes, bytes, bytes]] = []
        self._seq = 0
        self.sent_messages = 0
        self.sent_bytes = 0

    def send(self, src: bytes, dests: tuple[bytes, ...], raw: bytes, now: float) -> None:
        f = self.faults
        for d in dests:
            self.sent_messages += 1
            self.sent_bytes += len(raw)
            if d in f.blocked.get(src, frozenset()) or self._rng.random() < f.drop_prob:
                continue
            copies = 2 if self._rng.random() < f.duplicate_prob else 1
            for _ in range(copies):
                self._seq += 1
                heapq.heappush(self._queue, (now + self._rng.random() * f.max_delay, self._seq, src, d, raw))

    def next_time(self) -> float | None:
        return self._queue[0][0] if self._queue else None

    def pop(self) -> tuple[float, bytes, bytes, bytes]:
        """(time, src, dest, bytes) of the next delivery."""
        t, _, src, d, raw = heapq.heappop(self._queue)
        return t, src, d, raw

    def __len__(self) -> int:
        return len(self._queue)
