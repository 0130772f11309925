"""The network side of one peer: a sans-IO `BtardPeer` driven over a real `Transport` on an asyncio loop.

This is `btard.protocol.harness.Harness.run_step` for one peer, with a real clock and real sockets:

- every received protocol payload goes to ``peer.receive(payload, now)`` at once (also while the caller
  computes its gradient in a thread: the peer buffers the next step's messages and keeps answering);
- ``peer.tick(now)`` runs at ``peer.next_deadline``;
- ``Send`` events go to per-destination FIFO queues, each drained by its own task, so a slow or dead peer
  delays only its own queue and never the loop. FIFO order per destination matters: a DIGEST must not
  overtake the messages it lists (the receiver would pull what is already on its way).

Payloads that are not protocol messages (``btard.swarm.control``, a benchmark's own frames) go to
``on_other``. The clock is ``time.monotonic``; every deadline of the peer is relative to its own step start.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from btard.protocol.messages import MAGIC
from btard.protocol.peer import BtardPeer, PhaseEntered, Send, StepResult
from btard.protocol.state import Phase
from btard.transport.base import Incoming, Transport, TransportClosed, TransportError

logger = logging.getLogger(__name__)

# Protocol messages that arrive before the peer exists (a faster peer already began the first step while our
# genesis was still on its way) wait here: 64 messages per member of a 1024-peer swarm is far more than one
# step sends, and beyond it the oldest are dropped (the digest/pull round recovers them).
MAX_EARLY_MESSAGES = 65536


class Outbox:
    """One FIFO queue and one sender task per destination."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._queues: dict[bytes, asyncio.Queue[bytes]] = {}
        self._tasks: dict[bytes, asyncio.Task] = {}
        self.queued = 0  # messages (and their bytes) handed to the outbox, one per destination
        self.queued_bytes = 0
        self.sent = 0  # messages acknowledged by their receiver
        self.failed: dict[bytes, int] = {}

    def put(self, dest: bytes, raw: bytes) -> None:
        q = self._queues.get(dest)
        if q is None:
            q = self._queues[dest] = asyncio.Queue()
            self._tasks[dest] = asyncio.create_task(self._drain(dest, q))
        q.put_nowait(raw)
        self.queued += 1
        self.queued_bytes += len(raw)

    async def _drain(self, dest: bytes, q: asyncio.Queue[bytes]) -> None:
        while True:
            raw = await q.get()
            try:
                await self._transport.send(dest, raw)
                self.sent += 1
            except TransportClosed:
                return
            except TransportError as e:
                self.failed[dest] = self.failed.get(dest, 0) + 1
                logger.debug("send to %s failed: %s", dest.hex()[:8], e)
            finally:
                q.task_done()

    def drop(self, dest: bytes) -> None:
        """Forget a destination (a peer that left the run): its queued messages are discarded."""
        task = self._tasks.pop(dest, None)
        self._queues.pop(dest, None)
        if task is not None:
            task.cancel()

    def pending(self) -> int:
        return sum(q.qsize() for q in self._queues.values())

    async def flush(self, timeout: float) -> bool:
        """Wait until every queued message was sent or failed (at most ``timeout``); True if all were."""
        waits = [asyncio.ensure_future(q.join()) for q in self._queues.values()]
        if not waits:
            return True
        done, pending = await asyncio.wait(waits, timeout=timeout)
        for w in pending:
            w.cancel()
        return not pending

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._queues.clear()


@dataclass
class StepTiming:
    """When the peer reached each phase, in seconds after ``begin_step`` (phases it skipped are absent)."""

    phases: dict[str, float] = field(default_factory=dict)
    total: float = 0.0
    deadlines: int = 0  # how often a deadline (not a message) moved the step on: 0 in a healthy step

    def durations(self) -> dict[str, float]:
        """Seconds spent in each phase."""
        names = list(self.phases)
        ends = [self.phases[n] for n in names[1:]] + [self.total]
        return {n: round(e - self.phases[n], 6) for n, e in zip(names, ends)}


class ProtocolDriver:
    """Runs one `BtardPeer` over ``transport``. Call :meth:`start` on the loop, :meth:`attach` the peer
    (messages that came earlier are replayed to it), then :meth:`run_step` once per step.

    ``on_phase(step, phase)`` is called for every phase the peer enters (`PhaseEntered`), before the messages of
    that transition are handed to the transport (fault-injection tests crash the process there).
    """

    def __init__(
        self,
        transport: Transport,
        *,
        on_other: Callable[[Incoming], None] | None = None,
        on_phase: Callable[[int, Phase], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.transport = transport
        self.outbox = Outbox(transport)
        self.peer: BtardPeer | None = None
        self._on_other = on_other
        self._on_phase = on_phase
        self._clock = clock
        self._early: list[bytes] = []
        self._results: list[StepResult] = []
        self._wake = asyncio.Event()
        self._recv_task: asyncio.Task | None = None
        self._timing = StepTiming()
        self._t0 = 0.0
        self.received = 0

    def start(self) -> None:
        if self._recv_task is None:
            self._recv_task = asyncio.create_task(self._recv_loop())
            self._recv_task.add_done_callback(lambda _: self._wake.set())  # a crash of it must not go unseen

    def attach(self, peer: BtardPeer) -> None:
        """Hand the peer to the driver and replay the protocol messages that arrived before it existed."""
        self.peer = peer
        early, self._early = self._early, []
        now = self._clock()
        for raw in early:
            peer.receive(raw, now)
        self._pump()

    def send(self, dest: bytes, raw: bytes) -> None:
        """Queue a non-protocol payload (control message) in ``dest``'s FIFO queue."""
        self.outbox.put(dest, raw)

    async def _recv_loop(self) -> None:
        while True:
            try:
                incoming = await self.transport.recv()
            except TransportClosed:
                return
            self.received += 1
            payload = incoming.payload
            if payload[: len(MAGIC)] == MAGIC:
                if self.peer is None:
                    if len(self._early) >= MAX_EARLY_MESSAGES:
                        self._early.pop(0)
                    self._early.append(payload)
                    continue
                self.peer.receive(payload, self._clock())
                self._pump()
                self._wake.set()
            elif self._on_other is not None:
                self._on_other(incoming)

    def _pump(self) -> None:
        peer = self.peer
        assert peer is not None
        for ev in peer.events():
            if isinstance(
                ev, PhaseEntered
            ):  # in order with the sends: on_phase runs before that phase's sends
                self._timing.phases.setdefault(ev.phase.name, self._clock() - self._t0)
                if self._on_phase is not None:
                    self._on_phase(ev.step, ev.phase)
            elif isinstance(ev, Send):
                for dest in ev.dests:
                    if dest != peer.id:
                        self.outbox.put(dest, ev.raw)
            elif isinstance(ev, StepResult):
                self._timing.total = self._clock() - self._t0
                self._results.append(ev)

    async def run_step(
        self, params_hash: bytes, gradient: torch.Tensor | None
    ) -> tuple[StepResult, StepTiming]:
        """Begin the peer's current step and drive it to its `StepResult`."""
        peer = self.peer
        assert peer is not None, "attach a peer first"
        self._results.clear()
        self._t0 = self._clock()
        self._timing = StepTiming()
        peer.begin_step(self._t0, params_hash, gradient)
        self._pump()
        while not self._results:
            if self._recv_task is not None and self._recv_task.done():
                self._recv_task.result()  # re-raise what killed the receiver (a bug: peers never raise)
                raise RuntimeError("the receive loop stopped (transport closed)")
            deadline = peer.next_deadline
            # No deadline pending (it cannot happen mid-step, but never wait forever): tick every T.
            delay = peer.phase_timeout if deadline is None else deadline - self._clock()
            if delay > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                    continue  # a message arrived: the deadline may have changed
                except TimeoutError:
                    pass
            self._timing.deadlines += 1
            peer.tick(self._clock())
            self._pump()
        # The slowest phase feeds the next timeouts (module docstring of btard.protocol.peer); a step in which a
        # deadline had to pass measured the timeout itself, so it reports nothing.
        durations = self._timing.durations().values()
        peer.report_phase_time(max(durations) if durations and not self._timing.deadlines else 0.0)
        return self._results.pop(0), self._timing

    def forget(self, departed: set[bytes]) -> None:
        """Stop sending to peers that left the run (banned or excluded)."""
        for p in departed:
            self.outbox.drop(p)

    async def close(self, flush_timeout: float = 5.0) -> None:
        """Deliver what is queued (at most ``flush_timeout``), then stop the receiver and the senders."""
        await self.outbox.flush(flush_timeout)
        if self._recv_task is not None:
            self._recv_task.cancel()
            await asyncio.gather(self._recv_task, return_exceptions=True)
        await self.outbox.close()
