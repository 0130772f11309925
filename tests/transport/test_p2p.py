"""btard.transport over hivemind's libp2p daemon: records, validation, and a real 3-process loopback swarm.

The swarm test runs this file as a script in three child processes (``python test_p2p.py peer <config>``); the
test drives them with JSON lines on stdin and reads JSON replies on stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import blake3
import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from btard.transport.base import STATUS_TOO_LARGE
from btard.transport.records import (
    MAX_RECORD_BYTES,
    PeerRecord,
    RecordError,
    decode_record,
    encode_record,
    record_key,
)

# Importing hivemind imports torch, whose torch.jit.script deprecation warning is not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")

MiB = 1024**2
TTL, SKEW = 300.0, 30.0


def new_key() -> tuple[bytes, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw), key


def payload_for(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def digest(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


# ---------------------------------------------------------------------------------- records (no network)


def make_record(pid: bytes, run: str | None = "run-1", expiration: float | None = None) -> PeerRecord:
    expiration = time.time() + 100.0 if expiration is None else expiration
    return PeerRecord(pid, b"\x00\x24" + bytes(36), ("/ip4/127.0.0.1/tcp/4001/p2p/12D3Koo",), run, expiration)


def test_record_roundtrip() -> None:
    pid, key = new_key()
    for run in ("run-1", None):
        record = make_record(pid, run)
        assert decode_record(
            encode_record(record, key.sign), now=time.time(), max_ttl=TTL, max_clock_skew=SKEW
        ) == (record)


def test_forged_records_are_rejected() -> None:
    pid, key = new_key()
    other_pid, other_key = new_key()
    now = time.time()

    def check(blob: bytes, match: str) -> None:
        with pytest.raises(RecordError, match=match):
            decode_record(blob, now=now, max_ttl=TTL, max_clock_skew=SKEW)

    check(encode_record(make_record(pid), other_key.sign), "bad signature")  # pid's record, other's signature
    body, signature = msgpack.unpackb(encode_record(make_record(pid), key.sign))
    tampered = body.replace(b"run-1", b"run-2")
    check(msgpack.packb([tampered, signature]), "bad signature")
    check(encode_record(make_record(pid, expiration=now - 1.0), key.sign), "stale")
    check(encode_record(make_record(pid, expiration=now + TTL + SKEW + 10.0), key.sign), "distant")
    check(b"\xc1garbage", "undecodable")
    check(msgpack.packb([msgpack.ExtType(5, b"x"), signature]), "undecodable")  # no ext types
    check(msgpack.packb([[1], signature]), "bad body")
    check(b"\x00" * (MAX_RECORD_BYTES + 1), "too large")
    fields = msgpack.unpackb(body)
    fields[0] = 2
    bad_version = msgpack.packb(fields)
    check(msgpack.packb([bad_version, key.sign(b"x" * 32)]), "version")
    assert other_pid != pid


def test_validator_binds_records_to_their_dht_key() -> None:
    from hivemind.dht.protocol import DHTProtocol
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils.serializer import MSGPackSerializer

    from btard.transport.p2p import BindingRecordValidator, dht_key_id

    assert dht_key_id("btard/run-1/peers") == DHTID.generate(source="btard/run-1/peers").to_bytes()
    validator = BindingRecordValidator()
    pid, key = new_key()
    run_record, peer_record = make_record(pid, "run-1"), make_record(pid, None)
    run_value = MSGPackSerializer.dumps(encode_record(run_record, key.sign))
    peer_value = MSGPackSerializer.dumps(encode_record(peer_record, key.sign))
    run_id, peer_id = dht_key_id(record_key(run_record)), dht_key_id(record_key(peer_record))
    subkey, expiration = MSGPackSerializer.dumps(pid.hex()), run_record.expiration
    regular = DHTProtocol.IS_REGULAR_VALUE

    assert validator.validate(DHTRecord(run_id, subkey, run_value, expiration))
    assert validator.validate(DHTRecord(peer_id, regular, peer_value, peer_record.expiration))
    # Right signature, wrong place: another key or subkey, a regular value on a run key, another expiration.
    other_run, other_subkey = dht_key_id("btard/run-2/peers"), MSGPackSerializer.dumps("00" * 32)
    assert not validator.validate(DHTRecord(other_run, subkey, run_value, expiration))
    assert not validator.validate(DHTRecord(run_id, other_subkey, run_value, expiration))
    assert not validator.validate(DHTRecord(run_id, regular, peer_value, peer_record.expiration))
    assert not validator.validate(DHTRecord(run_id, subkey, run_value, expiration + 1.0))
    assert not validator.validate(DHTRecord(run_id, subkey, MSGPackSerializer.dumps(b"junk"), expiration))
    assert not validator.validate(DHTRecord(run_id, subkey, b"\xc1", expiration))
    # The validator's verdict ignores the clock, so every node agrees on it; freshness is the reader's check.
    distant = make_record(pid, "run-1", expiration=time.time() + 10 * TTL)
    distant_value = MSGPackSerializer.dumps(encode_record(distant, key.sign))
    assert validator.validate(DHTRecord(run_id, subkey, distant_value, distant.expiration))
    with pytest.raises(RecordError, match="distant"):
        decode_record(encode_record(distant, key.sign), now=time.time(), max_ttl=TTL, max_clock_skew=SKEW)


def test_config_validation() -> None:
    from btard.transport.p2p import P2PConfig

    with pytest.raises(ValueError):
        P2PConfig(max_message_bytes=0)
    with pytest.raises(ValueError):
        P2PConfig(max_streams_per_peer=8, max_inbound_streams_per_peer=4)


def test_dial_addresses_strip_own_suffix_and_drop_others() -> None:
    from hivemind.p2p import PeerID

    from btard.transport.p2p import _dial_addresses

    me = PeerID.from_base58("12D3KooWCBFaVg3wAYwpP2HyJcUa7yfFP6KMfJEJCXfTDVhVbiX1")
    other = "12D3KooWLYJeXYdkVzYx9xnPGaAp3WydZw3NZfB68Hj8auyESKRN"
    maddrs = (
        f"/ip4/127.0.0.1/tcp/4001/p2p/{me}",
        f"/ip4/10.0.0.1/tcp/1/p2p/{other}",
        "/ip4/10.0.0.2/tcp/2",
        "/x",
    )
    record = PeerRecord(bytes(32), me.to_bytes(), maddrs, None, time.time() + 10.0)
    assert [str(m) for m in _dial_addresses(record, me)] == ["/ip4/127.0.0.1/tcp/4001", "/ip4/10.0.0.2/tcp/2"]


def test_single_peer_local_behaviour() -> None:
    from btard.transport import MessageTooLarge, P2PConfig, P2PTransport, PeerUnreachable, TransportClosed

    async def scenario() -> int | None:
        pid, key = new_key()
        transport = await P2PTransport.create(
            P2PConfig(max_message_bytes=1000), protocol_id=pid, sign=key.sign
        )
        me = transport.local_address
        assert me.protocol_id == pid and me.maddrs == tuple(await transport.get_visible_maddrs())
        await transport.announce("solo")
        assert [(r.protocol_id, r.transport_id) for r in await transport.list_peers("solo")] == [
            (pid, me.transport_id)
        ]
        assert await transport.list_peers("nobody-here") == []
        assert (await transport.lookup(pid)).to_bytes() == me.transport_id

        await transport.send(pid, b"to myself")  # loops back without the network
        assert await transport.recv() == (me.transport_id, b"to myself")
        with pytest.raises(MessageTooLarge):
            await transport.send(pid, bytes(1001))
        stranger = new_key()[0]
        failures = await transport.broadcast([pid, stranger, pid], b"hello")
        assert list(failures) == [stranger] and isinstance(failures[stranger], PeerUnreachable)
        assert (await transport.recv()).payload == b"hello"
        with pytest.raises(TimeoutError):  # exactly once: duplicate destinations are dropped
            await asyncio.wait_for(transport.recv(), 0.2)
        with pytest.raises(ValueError):
            await transport.send(b"short", b"x")
        with pytest.raises(ValueError):
            await transport.announce("bad/run")

        waiting = asyncio.create_task(transport.recv())
        await asyncio.sleep(0)
        await transport.close()
        await transport.close()  # idempotent
        with pytest.raises(TransportClosed):
            await waiting
        with pytest.raises(TransportClosed):
            await transport.recv()
        with pytest.raises(TransportClosed):
            await transport.send(pid, b"x")
        return transport.daemon_pid

    daemon = asyncio.run(scenario())
    assert daemon is not None and not process_alive(daemon)


# ---------------------------------------------------------------------------------- child peer process


async def _forge(transport, run: str, victim: bytes) -> dict:
    """Act Byzantine: push badly signed records straight into the DHT storage of every peer and our own,
    bypassing our own validator: a fake member of ``run`` and a record redirecting ``victim`` to us."""
    from hivemind.dht.routing import DHTID
    from hivemind.utils.serializer import MSGPackSerializer

    from btard.transport.records import peer_key, run_key

    dht = transport._dht
    fake_pid, _ = new_key()
    _, wrong_key = new_key()
    me = transport.local_address
    expiration = time.time() + TTL
    fake_member = PeerRecord(fake_pid, me.transport_id, me.maddrs, run, expiration)
    impostor = PeerRecord(
        victim, me.transport_id, me.maddrs, None, expiration + 10.0
    )  # newer than the victim's
    items = [
        (DHTID.generate(source=run_key(run)), fake_pid.hex(), encode_record(fake_member, wrong_key.sign)),
        (DHTID.generate(source=peer_key(victim)), None, encode_record(impostor, wrong_key.sign)),
    ]
    accepted = []
    for key_id, subkey, blob in items:
        value = MSGPackSerializer.dumps(blob)
        dht.protocol.storage.store(key_id, value, expiration, subkey=subkey)  # our own storage serves it now
        for _, peer_id in dht.protocol.routing_table.get_nearest_neighbors(key_id, 20, exclude=dht.node_id):
            ok = await dht.protocol.call_store(peer_id, [key_id], [value], [expiration], subkeys=[subkey])
            accepted.append(bool(ok and ok[0]))
    return {"fake_pid": fake_pid.hex(), "remote_accepted": accepted}


async def _raw_frame(transport, dest: bytes, announced: int) -> dict:
    """Open a stream and announce a frame of ``announced`` bytes, sending only a few; return the status."""
    from btard.transport.p2p import HANDLER_NAME

    peer_id = await transport.lookup(dest)
    _, reader, writer = await transport._p2p.call_binary_stream_handler(peer_id, HANDLER_NAME)
    start = time.perf_counter()
    writer.write(b"\x01" + announced.to_bytes(8, "big") + b"partial body")
    await writer.drain()
    try:
        status = (await asyncio.wait_for(reader.readexactly(1), 10.0))[0]
    except (asyncio.IncompleteReadError, TimeoutError):
        status = None
    writer.close()
    return {"status": status, "elapsed": time.perf_counter() - start}


async def _peer_main() -> None:
    from btard.transport.base import TransportError
    from btard.transport.p2p import P2PConfig, P2PTransport  # slow (torch): done before the config arrives

    config = json.loads(await asyncio.to_thread(sys.stdin.readline))
    pid, key = new_key()
    transport = await P2PTransport.create(P2PConfig(**config), protocol_id=pid, sign=key.sign)
    received: list[list] = []
    arrived = asyncio.Event()

    def reply(message: dict) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    async def collect() -> None:
        while True:
            sender, payload = await transport.recv()
            received.append([sender.hex(), len(payload), digest(payload)])
            arrived.set()

    async def handle(cmd: dict) -> dict:
        op = cmd["op"]
        try:
            if op == "announce":
                await transport.announce(cmd["run"])
                return {}
            if op == "discover":  # the DHT is eventually consistent: poll until everyone is listed
                deadline = time.monotonic() + cmd["wait"]
                while True:
                    records = await transport.list_peers(cmd["run"])
                    found = {r.protocol_id.hex(): r.transport_id.hex() for r in records}
                    if set(found) >= set(cmd["expect"]) or time.monotonic() > deadline:
                        return {"peers": found}
                    await asyncio.sleep(0.2)
            if op == "lookup":
                return {"transport_id": (await transport.lookup(bytes.fromhex(cmd["pid"]))).to_bytes().hex()}
            if op == "send":
                start = time.perf_counter()
                await transport.send(bytes.fromhex(cmd["dest"]), payload_for(cmd["seed"], cmd["size"]))
                return {"elapsed": time.perf_counter() - start}
            if op == "broadcast":
                dests = [bytes.fromhex(d) for d in cmd["dests"]]
                failures = await transport.broadcast(dests, payload_for(cmd["seed"], cmd["size"]))
                return {"failures": {d.hex(): type(e).__name__ for d, e in failures.items()}}
            if op == "received":
                deadline = time.monotonic() + cmd["wait"]
                while len(received) < cmd["count"] and time.monotonic() < deadline:
                    arrived.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(arrived.wait(), max(0.0, deadline - time.monotonic()))
                messages = list(received)
                received.clear()
                return {"messages": messages}
            if op == "forge":
                return await _forge(transport, cmd["run"], bytes.fromhex(cmd["victim"]))
            if op == "raw_frame":
                return await _raw_frame(transport, bytes.fromhex(cmd["dest"]), cmd["announced"])
            raise ValueError(f"unknown op {op}")
        except TransportError as e:
            return {"error": type(e).__name__, "message": str(e)}

    async def run_and_reply(cmd: dict) -> None:
        result = await handle(cmd)
        reply({"id": cmd["id"], **result})

    collector = asyncio.create_task(collect())
    address = transport.local_address
    reply(
        {
            "protocol_id": pid.hex(),
            "transport_id": address.transport_id.hex(),
            "maddrs": await transport.get_visible_maddrs(),
            "daemon_pid": transport.daemon_pid,
            "client_socket": transport._p2p._client_listen_maddr[
                "unix"
            ],  # removed by close(), not by a crash
        }
    )
    tasks = set()
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line or json.loads(line)["op"] == "close":
            break
        task = asyncio.create_task(run_and_reply(json.loads(line)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    collector.cancel()
    await transport.close()
    await asyncio.gather(collector, return_exceptions=True)
    closed_cmd = json.loads(line) if line else None
    if closed_cmd is not None:
        reply({"id": closed_cmd["id"], "closed": True})


# ---------------------------------------------------------------------------------- test driver


class Peer:
    """A child process running :func:`_peer_main`, driven with JSON lines; the first line is its config."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "peer"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.pending: dict[int, dict] = {}
        self.next_id = 0
        threading.Thread(target=self._pump, daemon=True).start()
        self.info: dict = {}

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def _read(self, timeout: float) -> dict:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"peer {self.proc.pid} did not answer in {timeout} s") from None
        if not line:
            raise AssertionError(f"peer {self.proc.pid} exited with {self.proc.wait()}")
        return json.loads(line)

    def configure(self, config: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(config) + "\n")
        self.proc.stdin.flush()

    def started(self, timeout: float = 45.0) -> dict:
        self.info = self._read(timeout)
        return self.info

    def submit(self, op: str, **args) -> int:
        self.next_id += 1
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"id": self.next_id, "op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return self.next_id

    def result(self, request_id: int, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while request_id not in self.pending:
            message = self._read(max(0.1, deadline - time.monotonic()))
            self.pending[message.pop("id")] = message
        return self.pending.pop(request_id)

    def call(self, op: str, timeout: float = 30.0, **args) -> dict:
        return self.result(self.submit(op, **args), timeout)

    @property
    def pid(self) -> str:
        return self.info["protocol_id"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_three_peer_swarm_over_loopback(tmp_path: Path) -> None:
    run = "test-run"
    base = {"connect_timeout": 5.0, "io_timeout": 10.0, "max_message_bytes": 64 * MiB}
    peers = [Peer() for _ in range(3)]  # all three import hivemind (and torch) in parallel meanwhile
    a, b, c = peers
    try:
        # A starts the swarm; B (with a smaller limit) and C join through A's multiaddrs.
        a.configure({**base, "identity_path": str(tmp_path / "a.key")})
        a.started()
        join = {**base, "initial_peers": a.info["maddrs"]}
        b.configure({**join, "identity_path": str(tmp_path / "b.key"), "max_message_bytes": 24 * MiB})
        c.configure({**join, "identity_path": str(tmp_path / "c.key")})
        b.started(), c.started()
        assert len({p.info["transport_id"] for p in peers}) == 3, "each peer needs its own libp2p identity"
        for p in peers:
            assert p.call("announce", run=run) == {}

        # C forges records before anyone looks: they must be refused by honest storage and ignored by readers.
        forged = c.call("forge", run=run, victim=b.pid)
        assert forged["remote_accepted"] and not any(forged["remote_accepted"])
        assert a.call("lookup", pid=b.pid) == {"transport_id": b.info["transport_id"]}
        assert a.call("lookup", pid=forged["fake_pid"])["error"] == "PeerUnreachable"

        expected = {p.pid: p.info["transport_id"] for p in peers}
        for p in peers:
            assert p.call("discover", run=run, expect=list(expected), wait=20.0) == {"peers": expected}

        # Small messages: everyone broadcasts to the two others.
        for i, p in enumerate(peers):
            others = [q.pid for q in peers if q is not p]
            assert p.call("broadcast", dests=others, size=100 + i, seed=i) == {"failures": {}}
        for p in peers:
            got = sorted(p.call("received", count=2, wait=10.0)["messages"])
            want = sorted(
                [q.info["transport_id"], 100 + i, digest(payload_for(i, 100 + i))]
                for i, q in enumerate(peers)
                if q is not p
            )
            assert got == want

        # 20 MB in both directions at once, content checked by BLAKE3.
        size = 20 * MiB
        ids = (
            a.submit("send", dest=b.pid, size=size, seed=10),
            b.submit("send", dest=a.pid, size=size, seed=11),
        )
        assert "error" not in a.result(ids[0], 60.0) and "error" not in b.result(ids[1], 60.0)
        assert b.call("received", count=1, wait=10.0)["messages"] == [
            [a.info["transport_id"], size, digest(payload_for(10, size))]
        ]
        assert a.call("received", count=1, wait=10.0)["messages"] == [
            [b.info["transport_id"], size, digest(payload_for(11, size))]
        ]

        # Oversized: B (24 MiB limit) refuses 30 MiB from A, and a header announcing 1 TiB from C is refused
        # at once, from the header alone (allocating or awaiting the body would fail or time out instead).
        oversized = a.call("send", dest=b.pid, size=30 * MiB, seed=12)
        assert oversized.get("error") == "MessageRejected", oversized
        raw = c.call("raw_frame", dest=b.pid, announced=1 << 40)
        assert raw["status"] == STATUS_TOO_LARGE and raw["elapsed"] < 5.0
        # B keeps working.
        assert "error" not in a.call("send", dest=b.pid, size=1000, seed=13)
        assert b.call("received", count=1, wait=10.0)["messages"] == [
            [a.info["transport_id"], 1000, digest(payload_for(13, 1000))]
        ]
        assert a.call("send", dest=new_key()[0].hex(), size=10, seed=0)["error"] == "PeerUnreachable"

        # C crashes (SIGKILL, no cleanup at all): its daemon must not outlive it, sending to it fails cleanly
        # and quickly, and A and B still talk.
        c.kill()
        deadline = time.monotonic() + 10.0
        while process_alive(c.info["daemon_pid"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not process_alive(c.info["daemon_pid"]), "p2pd outlived its crashed Python process"
        os.remove(c.info["client_socket"])  # hivemind's unix socket file for incoming streams stays behind
        start = time.monotonic()
        assert a.call("send", dest=c.pid, size=10, seed=0, timeout=30.0)["error"] == "PeerUnreachable"
        assert time.monotonic() - start < 20.0
        assert "error" not in b.call("send", dest=a.pid, size=10, seed=14)
        assert a.call("received", count=1, wait=10.0)["messages"][0][1] == 10

        # A and B shut down cleanly: exit code 0 and no daemon left behind.
        daemons = [p.info["daemon_pid"] for p in (a, b)]
        for p in (a, b):
            assert p.call("close", timeout=30.0) == {"closed": True}
            assert p.proc.wait(timeout=30) == 0
        assert not any(process_alive(d) for d in daemons), "a p2pd daemon outlived its transport"
        assert not any(os.path.exists(p.info["client_socket"]) for p in (a, b))
    finally:
        for p in peers:
            p.kill()


if __name__ == "__main__" and sys.argv[1:] == ["peer"]:
    os.environ.setdefault("GOLOG_LOG_LEVEL", "error")
    asyncio.run(_peer_main())
