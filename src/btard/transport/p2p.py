"""A :class:`~btard.transport.base.Transport` over hivemind's libp2p daemon, with discovery through its DHT.

Each transport owns one ``p2pd`` child process (hivemind ``P2P``) and one in-process hivemind ``DHTNode`` that
runs on the same event loop and the same daemon. Messages travel as length-prefixed frames over libp2p streams
(one binary stream handler); idle streams are kept and reused per destination, which is ~4x faster than a new
stream per message for tiny messages and as fast or faster for large ones (see ``benchmarks/transport.py``).

Discovery: every transport stores a signed :class:`~btard.transport.records.PeerRecord` under
``btard/peer/<protocol id hex>`` (for :meth:`P2PTransport.lookup`) and, per run it joins, under the dictionary
``btard/<run id>/peers`` with subkey = protocol id hex (for :meth:`P2PTransport.list_peers`). Records are
re-announced every ``record_ttl / 3`` seconds. The DHT accepts only such records (a strict validator on store
and on fetch) and the reader verifies each one again before use.

Usage::

    key = Ed25519PrivateKey.generate()
    pid = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    transport = await P2PTransport.create(P2PConfig(initial_peers=[...]), protocol_id=pid, sign=key.sign)
    await transport.announce("my-run")
    peers = await transport.list_peers("my-run")
    await transport.send(peers[0].protocol_id, b"...")
    sender, payload = await transport.recv()
    await transport.close()

Create, use and close it from one event loop (any thread: checked from a worker thread too); hivemind binds its
streams to that loop. Importing this module imports hivemind, which imports torch (~2-3 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgpack
from hivemind.dht.node import DHTNode
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.utils.multiaddr import Multiaddr

from btard.transport.base import (
    FRAME_HEADER_BYTES,
    KIND_MESSAGE,
    STATUS_BAD_FRAME,
    STATUS_CLOSING,
    STATUS_OK,
    STATUS_TOO_LARGE,
    Incoming,
    LocalAddress,
    MessageRejected,
    MessageTooLarge,
    PeerUnreachable,
    Transport,
    TransportClosed,
    check_protocol_id,
)
from btard.transport.records import (
    MAX_RECORD_BYTES,
    PeerRecord,
    RecordError,
    Signer,
    check_run_id,
    decode_record,
    encode_record,
    parse_record,
    peer_key,
    record_key,
    run_key,
)

logger = logging.getLogger(__name__)

HANDLER_NAME = "btard.transport.v1"  # the libp2p protocol id of the message stream handler

# 256 MiB: a ResNet-18 gradient part is ~3 MB at 16 peers and the whole fp32 model 45 MB; a joiner downloads
# parameters plus optimizer state (2-3x). Peers that need more must raise it on every receiver.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024**2
READ_CHUNK_BYTES = 1024**2  # receive buffers grow by at most this much per read: memory follows real bytes
REJECT_LINGER_S = 2.0  # after rejecting a frame, wait this long for the sender to read why and hang up


@dataclass
class P2PConfig:
    """Settings of one :class:`P2PTransport`. Each peer needs its own ``identity_path`` (or None)."""

    initial_peers: list[str] = field(default_factory=list)  # full multiaddrs with /p2p/<id>; [] = new swarm
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    announce_maddrs: list[str] | None = None  # what to publish instead of the listen addresses (e.g. NAT)
    identity_path: str | None = None  # libp2p private key file (created if missing); None = fresh key
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    connect_timeout: float = 15.0  # opening a stream, including libp2p dialing
    io_timeout: float = 30.0  # a receiver drops a stream that makes no progress for this long
    # Bytes/s that a send() may not fall below: its deadline is connect_timeout + io_timeout + size / this.
    min_send_rate: float = 1e6
    recv_queue_size: int = 1024  # messages buffered for recv(); when full, senders wait (backpressure)
    reuse_streams: bool = True
    # Concurrent outgoing streams per destination; more sends wait their turn. hivemind's Python side accepts
    # streams on a unix socket with asyncio's default backlog of 100, so bursts of hundreds of new streams to
    # one receiver fail (measured: 500 concurrent sends -> BrokenPipeError).
    max_streams_per_peer: int = 8
    max_idle_streams_per_peer: int = 2  # kept open for reuse after a burst (each costs a socket on both ends)
    max_inbound_streams_per_peer: int = 32  # a receiver closes further streams from one sender at once
    stream_idle_timeout: float = 60.0  # receiver closes a stream idle this long; senders reuse for half of it
    record_ttl: float = 300.0  # lifetime of our DHT records (re-announced every third of it)
    max_clock_skew: float = 30.0  # tolerated excess of a record's expiration over now + record_ttl
    dht_rpc_timeout: float = 3.0  # one DHT request to one peer
    startup_timeout: float = 30.0  # p2pd start
    check_identity_free: bool = True  # with an existing identity file, check that no live peer uses it (slow)

    def __post_init__(self) -> None:
        if min(self.max_message_bytes, self.recv_queue_size, self.max_streams_per_peer) <= 0:
            raise ValueError("max_message_bytes, recv_queue_size and max_streams_per_peer must be positive")
        if self.max_idle_streams_per_peer < 0:
            raise ValueError("max_idle_streams_per_peer must be >= 0")
        if self.max_inbound_streams_per_peer < self.max_streams_per_peer:
            raise ValueError("max_inbound_streams_per_peer must be >= max_streams_per_peer")
        if min(self.connect_timeout, self.io_timeout, self.min_send_rate, self.record_ttl) <= 0:
            raise ValueError("timeouts, min_send_rate and record_ttl must be positive")


def dht_key_id(key: str) -> bytes:
    """The id hivemind's DHT files ``key`` under (``DHTID.generate(key).to_bytes()``), computed without it."""
    return hashlib.sha1(msgpack.packb(key, use_bin_type=True)).digest()


class BindingRecordValidator(RecordValidatorBase):
    """Accepts exactly the validly signed, correctly keyed :class:`PeerRecord` blobs; rejects everything else.

    hivemind calls it when another peer asks us to store a record and on every record another peer returns to
    us (a dictionary with one bad entry is dropped whole), so honest nodes never keep or pass on a forged
    binding. It deliberately ignores the clock (see :func:`~btard.transport.records.parse_record`); readers
    check freshness per record."""

    def validate(self, record: DHTRecord) -> bool:
        try:
            verified = parse_record(unwrap_dht_value(record.value))
        except RecordError:
            return False
        if record.key != dht_key_id(record_key(verified)) or record.expiration_time != verified.expiration:
            return False
        if verified.run_id is None:
            return record.subkey == DHTProtocol.IS_REGULAR_VALUE
        return record.subkey == msgpack.packb(verified.protocol_id.hex(), use_bin_type=True)


def unwrap_dht_value(value: bytes) -> bytes:
    """Our record blob from a raw DHT value (hivemind stores values msgpack-serialized: a bin object)."""
    try:
        blob = msgpack.unpackb(value, raw=False, max_bin_len=MAX_RECORD_BYTES, max_ext_len=0)
    except Exception:
        raise RecordError("undecodable DHT value") from None
    if not isinstance(blob, bytes):
        raise RecordError("DHT value is not a byte string")
    return blob


def _dial_addresses(record: PeerRecord, peer_id: PeerID) -> list[Multiaddr]:
    """The record's multiaddrs without their /p2p/<id> suffix (p2pd's CONNECT rejects it); addresses of
    another peer id or unparsable ones are dropped."""
    suffix = f"/p2p/{peer_id.to_base58()}"
    addresses = []
    for text in record.maddrs:
        if text.endswith(suffix):
            text = text[: -len(suffix)]
        if "/p2p/" in text or "/p2p-circuit" in text:
            continue
        with contextlib.suppress(Exception):  # peer-supplied text: any parse error just drops the address
            addresses.append(Multiaddr(text))
    return addresses


@dataclass
class _Stream:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    last_used: float

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class P2PTransport(Transport):
    """libp2p transport with DHT discovery; build it with :meth:`create`, release it with :meth:`close`."""

    def __init__(
        self, config: P2PConfig, protocol_id: bytes, sign: Signer, p2p: P2P, maddrs: tuple[str, ...]
    ) -> None:
        self.config = config
        self.max_message_bytes = config.max_message_bytes
        self._protocol_id = protocol_id
        self._sign = sign
        self._p2p = p2p
        self._address = LocalAddress(protocol_id, p2p.peer_id.to_bytes(), maddrs)
        self._dht: DHTNode | None = None
        self._queue: asyncio.Queue[Incoming | None] = asyncio.Queue(config.recv_queue_size)
        self._idle: dict[bytes, list[_Stream]] = {}
        self._last_sweep = time.monotonic()
        self._slots: dict[bytes, asyncio.Semaphore] = {}  # outgoing stream slots per destination libp2p id
        self._inbound_count: dict[bytes, int] = {}
        self._records: dict[bytes, PeerRecord] = {}  # verified bindings by protocol id
        self._dialed: set[bytes] = set()  # libp2p ids we opened a stream to since we last forgot them
        self._runs: set[str] = set()
        self._inbound: set[asyncio.Task] = set()
        self._refresh_task: asyncio.Task | None = None
        self._closed = False

    @classmethod
    async def create(cls, config: P2PConfig, *, protocol_id: bytes, sign: Signer) -> P2PTransport:
        """Start the daemon, join (or start) the DHT, listen for messages and announce our lookup record.

        ``sign(digest) -> signature`` must sign with the Ed25519 key whose public key is ``protocol_id``."""
        check_protocol_id(protocol_id)
        p2p = await P2P.create(
            initial_peers=config.initial_peers or None,
            host_maddrs=config.host_maddrs,
            announce_maddrs=config.announce_maddrs,
            identity_path=config.identity_path,
            startup_timeout=config.startup_timeout,
            check_if_identity_free=config.check_identity_free,
        )
        self: P2PTransport | None = None
        try:
            maddrs = tuple(str(m) for m in await p2p.get_visible_maddrs())
            self = cls(config, protocol_id, sign, p2p, maddrs)
            self._dht = await DHTNode.create(
                p2p=p2p,
                initial_peers=config.initial_peers or None,
                wait_timeout=config.dht_rpc_timeout,
                record_validator=BindingRecordValidator(),
                cache_nearest=0,  # no fire-and-forget caching tasks that could outlive close()
            )
            await p2p.add_binary_stream_handler(HANDLER_NAME, self._handle_stream)
            await self._announce([None])
            self._refresh_task = asyncio.create_task(self._refresh_loop())
            return self
        except BaseException:
            if self is not None:
                await self.close()
            else:
                await p2p.shutdown()
            raise

    # ---------------------------------------------------------------- addresses and discovery

    @property
    def local_address(self) -> LocalAddress:
        return self._address

    @property
    def protocol_id(self) -> bytes:
        return self._protocol_id

    @property
    def daemon_pid(self) -> int | None:
        """Process id of this transport's p2pd child (for supervision and leak checks)."""
        child = self._p2p._child
        return None if child is None else child.pid

    async def get_visible_maddrs(self) -> list[str]:
        """Full multiaddrs (with /p2p/<id>) that other peers can pass as ``initial_peers``."""
        return [str(m) for m in await self._p2p.get_visible_maddrs(latest=True)]

    async def announce(self, run_id: str) -> None:
        """Publish our membership record for ``run_id`` now and keep refreshing it until :meth:`close`."""
        self._check_open()
        self._runs.add(check_run_id(run_id))
        await self._announce([run_id])

    async def _announce(self, runs: Sequence[str | None]) -> None:
        assert self._dht is not None
        expiration = time.time() + self.config.record_ttl
        records = [
            PeerRecord(self._protocol_id, self._address.transport_id, self._address.maddrs, run, expiration)
            for run in runs
        ]
        blobs = [encode_record(r, self._sign) for r in records]
        keys = [record_key(r) for r in records]
        subkeys = [None if r.run_id is None else self._protocol_id.hex() for r in records]
        ok = await self._dht.store_many(keys, blobs, expiration, subkeys=subkeys)
        if not all(ok.values()):
            # Not an error: hivemind reports the answer of whichever replica replied last, and a Byzantine node
            # refusing (or holding a forged "newer" value) must not stop us from starting or announcing.
            logger.info("some DHT replicas refused our records: %s", ok)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.record_ttl / 3)
            try:
                await self._announce([None, *sorted(self._runs)])
            except Exception as e:  # keep trying: a transient DHT failure must not end announcements
                logger.warning("re-announcing records failed: %r", e)

    async def resolve(self, protocol_id: bytes) -> PeerRecord:
        """The verified record of ``protocol_id`` (cached until it expires), or :class:`PeerUnreachable`."""
        self._check_open()
        check_protocol_id(protocol_id)
        cached = self._records.get(protocol_id)
        if cached is not None and cached.expiration > time.time():
            return cached
        assert self._dht is not None
        found = await self._dht.get(peer_key(protocol_id), latest=True)
        if found is None:
            raise PeerUnreachable(protocol_id, "no record in the DHT")
        try:
            record = self._decode(found.value)
        except RecordError as e:
            raise PeerUnreachable(protocol_id, f"invalid record: {e}") from None
        if record.protocol_id != protocol_id or record.run_id is not None:
            raise PeerUnreachable(protocol_id, "record under the wrong key")
        self._remember(record)
        return record

    async def lookup(self, protocol_id: bytes) -> PeerID:
        """The libp2p peer id that ``protocol_id`` announced (signed and fresh)."""
        return PeerID((await self.resolve(protocol_id)).transport_id)

    async def list_peers(self, run_id: str) -> list[PeerRecord]:
        """Verified membership records of ``run_id`` by protocol id; forged or stale ones are dropped."""
        self._check_open()
        assert self._dht is not None
        found = await self._dht.get(run_key(run_id), latest=True)
        if found is None or not isinstance(found.value, dict):
            return []
        peers = []
        for subkey, item in found.value.items():
            try:
                record = self._decode(item.value)
            except RecordError as e:
                logger.debug("dropped a record of run %s: %s", run_id, e)
                continue
            if record.run_id != run_id or subkey != record.protocol_id.hex():
                continue
            peers.append(record)
            self._remember(record)
        return sorted(peers, key=lambda r: r.protocol_id)

    def _decode(self, value: object) -> PeerRecord:
        """Verify a value returned by DHTNode.get (already unwrapped by hivemind) before any use."""
        if not isinstance(value, bytes):
            raise RecordError("DHT value is not a byte string")
        return decode_record(
            value, now=time.time(), max_ttl=self.config.record_ttl, max_clock_skew=self.config.max_clock_skew
        )

    def _remember(self, record: PeerRecord) -> None:
        previous = self._records.get(record.protocol_id)
        if previous is None or previous.expiration < record.expiration:
            self._records[record.protocol_id] = record

    # ---------------------------------------------------------------- sending

    async def send(self, dest: bytes, payload: bytes) -> None:
        self._check_open()
        check_protocol_id(dest)
        size = len(payload)
        if size > self.max_message_bytes:
            raise MessageTooLarge(f"{size}-byte payload exceeds max_message_bytes={self.max_message_bytes}")
        if dest == self._protocol_id:
            await self._queue.put(Incoming(self._address.transport_id, bytes(payload)))
            return
        deadline = self.config.connect_timeout + self.config.io_timeout + size / self.config.min_send_rate
        try:
            async with asyncio.timeout(deadline):
                record = await self.resolve(dest)
                await self._send_frame(record, payload)
        except TimeoutError:
            self._forget(dest)
            raise PeerUnreachable(dest, f"no acknowledgement within {deadline:.1f} s") from None
        except PeerUnreachable:
            self._forget(dest)  # the peer may have restarted with a new address: look it up again next time
            raise

    def _forget(self, dest: bytes) -> None:
        record = self._records.pop(dest, None)
        if record is not None:
            self._dialed.discard(record.transport_id)

    async def _send_frame(self, record: PeerRecord, payload: bytes) -> None:
        peer = record.transport_id
        slots = self._slots.get(peer)
        if slots is None:
            slots = self._slots[peer] = asyncio.Semaphore(self.config.max_streams_per_peer)
        async with slots:
            stream = self._take_idle(peer)
            if stream is None:
                stream = await self._open_stream(record)
                status = await self._exchange(record.protocol_id, stream, payload, retryable=False)
            else:
                status = await self._exchange(record.protocol_id, stream, payload, retryable=True)
                if status is None:  # the reused stream had died meanwhile: one more try on a fresh one
                    stream = await self._open_stream(record)
                    status = await self._exchange(record.protocol_id, stream, payload, retryable=False)
            if status != STATUS_OK:
                stream.close()
                if status == STATUS_CLOSING:
                    raise PeerUnreachable(record.protocol_id, "the peer is shutting down")
                raise MessageRejected(record.protocol_id, status)
            self._put_idle(peer, stream)

    async def _exchange(self, dest: bytes, stream: _Stream, payload: bytes, *, retryable: bool) -> int | None:
        """Write one frame and read its status; None if a reused stream broke (caller retries).

        The status is read while the body is still being written: a receiver that rejects a frame answers
        after the header and closes, and once the connection is reset asyncio's reader raises before
        returning bytes it had already buffered, so a status read only after the write would be lost."""
        status_read = asyncio.ensure_future(stream.reader.readexactly(1))
        drained: asyncio.Future | None = None
        try:
            stream.writer.write(KIND_MESSAGE.to_bytes(1, "big") + len(payload).to_bytes(8, "big"))
            stream.writer.write(payload)
            drained = asyncio.ensure_future(stream.writer.drain())
            await asyncio.wait((status_read, drained), return_when=asyncio.FIRST_COMPLETED)
            if not status_read.done() or status_read.exception() is None and status_read.result() == b"\x00":
                await drained  # a write error here, before any status arrived, means the stream broke
            return (await status_read)[0]  # a rejection may arrive before the body is written: stop there
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as e:
            stream.close()
            if retryable:
                return None
            raise PeerUnreachable(dest, f"stream broke: {type(e).__name__}") from None
        except BaseException:  # cancelled or timed out mid-frame: the stream is in an unknown state
            stream.close()
            raise
        finally:
            for task in (status_read, drained):
                if task is None:
                    continue
                if not task.done():
                    task.cancel()
                elif not task.cancelled():
                    task.exception()  # mark it retrieved: asyncio would log "exception was never retrieved"

    async def _open_stream(self, record: PeerRecord) -> _Stream:
        peer_id, dest = PeerID(record.transport_id), record.protocol_id
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                if record.transport_id not in self._dialed:
                    # First contact: hand the daemon the signed addresses (libp2p authenticates the peer id, so a
                    # wrong address can only fail); otherwise it may first search libp2p's own DHT for them.
                    with contextlib.suppress(P2PDaemonError, ConnectionError, OSError, ValueError):
                        await self._p2p._client.connect(peer_id, _dial_addresses(record, peer_id))
                _, reader, writer = await self._p2p.call_binary_stream_handler(peer_id, HANDLER_NAME)
        except TimeoutError:
            raise PeerUnreachable(dest, f"no stream within {self.config.connect_timeout} s") from None
        except (P2PDaemonError, ConnectionError, OSError, asyncio.IncompleteReadError) as e:
            raise PeerUnreachable(dest, f"could not open a stream: {e}") from None
        self._dialed.add(record.transport_id)
        return _Stream(reader, writer, time.monotonic())

    def _reusable(self, stream: _Stream, now: float) -> bool:
        fresh = now - stream.last_used < self.config.stream_idle_timeout / 2  # the receiver waits twice that
        return fresh and not stream.reader.at_eof() and not stream.writer.is_closing()

    def _take_idle(self, peer: bytes) -> _Stream | None:
        streams = self._idle.get(peer)
        while streams:
            stream = streams.pop()
            if self._reusable(stream, time.monotonic()):
                return stream
            stream.close()
        return None

    def _put_idle(self, peer: bytes, stream: _Stream) -> None:
        now = time.monotonic()
        if now - self._last_sweep > self.config.stream_idle_timeout / 2:  # close streams of quiet peers too
            self._last_sweep = now
            for key, streams in list(self._idle.items()):
                for stale in [s for s in streams if not self._reusable(s, now)]:
                    streams.remove(stale)
                    stale.close()
                if not streams:
                    del self._idle[key]
        streams = self._idle.setdefault(peer, [])
        if (
            self._closed
            or not self.config.reuse_streams
            or len(streams) >= self.config.max_idle_streams_per_peer
        ):
            stream.close()
            return
        stream.last_used = now
        streams.append(stream)

    # ---------------------------------------------------------------- receiving

    async def recv(self) -> Incoming:
        if self._closed and self._queue.empty():
            raise TransportClosed("transport is closed")
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)  # wake the next waiter too
            raise TransportClosed("transport is closed")
        return item

    async def _handle_stream(
        self, info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        sender = info.peer_id.to_bytes()
        in_frame = False
        if self._inbound_count.get(sender, 0) >= self.config.max_inbound_streams_per_peer:
            logger.info("refused a stream from %s: too many open streams", info.peer_id)
            writer.close()
            return
        self._inbound.add(task)
        self._inbound_count[sender] = self._inbound_count.get(sender, 0) + 1
        try:
            while not self._closed:
                try:
                    async with asyncio.timeout(self.config.stream_idle_timeout):
                        header = await reader.readexactly(FRAME_HEADER_BYTES)
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    return  # idle too long, or the sender closed the stream: both are normal
                kind, size = header[0], int.from_bytes(header[1:], "big")
                in_frame = True
                if kind != KIND_MESSAGE or size > self.max_message_bytes:
                    # Checked on the header alone: nothing of the announced size is allocated or read.
                    logger.info("rejected a frame from %s: kind=%d size=%d", info.peer_id, kind, size)
                    await self._reject(
                        reader, writer, STATUS_BAD_FRAME if kind != KIND_MESSAGE else STATUS_TOO_LARGE
                    )
                    return
                payload = await self._read_body(reader, size)
                if payload is None:
                    return
                await self._queue.put(Incoming(sender, payload))
                if not await self._reply(writer, STATUS_OK):
                    return
                in_frame = False
        except asyncio.CancelledError:
            if in_frame:  # tell a sender waiting for this frame's status; an idle stream just closes
                with contextlib.suppress(Exception):
                    writer.write(bytes([STATUS_CLOSING]))
            if not self._closed:
                raise
            # Cancelled by close(): end normally (asyncio's stream server logs a cancelled handler as error).
        finally:
            self._inbound.discard(task)
            self._inbound_count[sender] -= 1
            if not self._inbound_count[sender]:
                del self._inbound_count[sender]
            writer.close()

    async def _read_body(self, reader: asyncio.StreamReader, size: int) -> bytes | None:
        """Read exactly ``size`` bytes, failing if no byte arrives for ``io_timeout``; None on EOF/timeout."""
        chunks: list[bytes] = []
        remaining = size
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.config.io_timeout) as deadline:
                while remaining:
                    chunk = await reader.read(min(remaining, READ_CHUNK_BYTES))
                    if not chunk:
                        return None
                    chunks.append(chunk)
                    remaining -= len(chunk)
                    deadline.reschedule(loop.time() + self.config.io_timeout)
        except (TimeoutError, OSError):  # OSError covers ConnectionError (a reset mid-body)
            return None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _reject(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int) -> None:
        """Send a rejection, then discard input until the sender hangs up (at most ``REJECT_LINGER_S``).

        Closing at once would make the daemons reset the stream while the sender is still writing, and the
        reset can overtake the status byte (measured: a 30 MiB frame then fails with BrokenPipeError)."""
        if not await self._reply(writer, status):
            return
        with contextlib.suppress(TimeoutError, ConnectionError, OSError):
            async with asyncio.timeout(REJECT_LINGER_S):
                while await reader.read(READ_CHUNK_BYTES):
                    pass

    async def _reply(self, writer: asyncio.StreamWriter, status: int) -> bool:
        try:
            writer.write(bytes([status]))
            async with asyncio.timeout(self.config.io_timeout):
                await writer.drain()
            return True
        except (TimeoutError, ConnectionError, OSError):
            return False

    # ---------------------------------------------------------------- shutdown

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosed("transport is closed")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        tasks = [t for t in (self._refresh_task, *self._inbound) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for streams in self._idle.values():
            for stream in streams:
                stream.close()
        self._idle.clear()
        if self._dht is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._dht.shutdown(), self.config.io_timeout)
            refresher = self._dht.cache_refresh_task
            if refresher is not None and not refresher.done():
                refresher.cancel()
                await asyncio.gather(refresher, return_exceptions=True)
        await self._p2p.shutdown()  # terminates p2pd and waits for it: no orphan daemon
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)
