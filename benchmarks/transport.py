"""Throughput of btard.transport.P2PTransport versus plain asyncio TCP on loopback, between two processes.

Usage: python benchmarks/transport.py [--sizes-mb 1 10 44] [--repeats 5] [--tiny 500] [--out FILE.json]
(default output: bench-results/transport.json)

Both sides use the same framing (9-byte header, 1-byte acknowledgement), so the difference is libp2p's cost
(two p2pd daemons with TLS and yamux, plus the unix sockets between each daemon and its Python process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from btard.transport.p2p import P2PConfig, P2PTransport

MAX_BYTES = 64 * 1024**2


def _new_identity() -> tuple[bytes, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw), key


async def _tcp_receiver(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            header = await reader.readexactly(9)
            await reader.readexactly(int.from_bytes(header[1:], "big"))
            writer.write(b"\x00")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
        pass  # the sender hung up, or the benchmark is over
    finally:
        writer.close()


async def run_receiver() -> None:
    """Serve both a P2PTransport and a TCP server; print how to reach them; exit when stdin closes."""
    pid, key = _new_identity()
    transport = await P2PTransport.create(
        P2PConfig(max_message_bytes=MAX_BYTES), protocol_id=pid, sign=key.sign
    )
    server = await asyncio.start_server(_tcp_receiver, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    info = {"maddrs": await transport.get_visible_maddrs(), "protocol_id": pid.hex(), "tcp_port": port}
    print(json.dumps(info), flush=True)

    async def drain_messages() -> None:
        while True:
            await transport.recv()

    consumer = asyncio.create_task(drain_messages())
    await asyncio.to_thread(sys.stdin.read)  # the parent closes stdin when done
    consumer.cancel()
    server.close()
    await transport.close()


async def _time_tcp(port: int, payload: bytes, repeats: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x01" + len(payload).to_bytes(8, "big") + payload)  # warm-up, as for the transport
    await writer.drain()
    await reader.readexactly(1)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        writer.write(b"\x01" + len(payload).to_bytes(8, "big"))
        writer.write(payload)
        await writer.drain()
        await reader.readexactly(1)
        best = min(best, time.perf_counter() - start)
    writer.close()
    return best


async def _time_p2p(transport: P2PTransport, dest: bytes, payload: bytes, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        await transport.send(dest, payload)
        best = min(best, time.perf_counter() - start)
    return best


async def run_sender(args: argparse.Namespace) -> dict:
    child = subprocess.Popen(
        [sys.executable, __file__, "--receiver"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        info = json.loads(await asyncio.to_thread(child.stdout.readline))
        dest = bytes.fromhex(info["protocol_id"])
        results: dict = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()}
        for reuse in (True, False):
            pid, key = _new_identity()
            config = P2PConfig(initial_peers=info["maddrs"], max_message_bytes=MAX_BYTES, reuse_streams=reuse)
            start = time.perf_counter()
            transport = await P2PTransport.create(config, protocol_id=pid, sign=key.sign)
            mode = "reuse_streams" if reuse else "stream_per_message"
            results.setdefault("startup_s", round(time.perf_counter() - start, 3))
            # Warm up (libp2p connection, yamux windows, allocator): without it the mode measured first loses.
            await transport.send(dest, os.urandom(int(max(args.sizes_mb) * 1024**2)))
            tiny = b"x" * 100
            start = time.perf_counter()
            for _ in range(args.tiny):
                await transport.send(dest, tiny)
            sequential = (time.perf_counter() - start) / args.tiny
            start = time.perf_counter()
            await asyncio.gather(*(transport.send(dest, tiny) for _ in range(args.tiny)))
            concurrent = (time.perf_counter() - start) / args.tiny
            results[mode] = {"tiny_sequential_ms": sequential * 1e3, "tiny_concurrent_ms": concurrent * 1e3}
            for size_mb in args.sizes_mb:
                payload = os.urandom(int(size_mb * 1024**2))
                seconds = await _time_p2p(transport, dest, payload, args.repeats)
                results[mode][f"{size_mb}MB_MBps"] = len(payload) / seconds / 1e6
            await transport.close()
        results["tcp"] = {}
        for size_mb in args.sizes_mb:
            payload = os.urandom(int(size_mb * 1024**2))
            seconds = await _time_tcp(info["tcp_port"], payload, args.repeats)
            results["tcp"][f"{size_mb}MB_MBps"] = len(payload) / seconds / 1e6
        return results
    finally:
        if child.stdin is not None:
            child.stdin.close()
        child.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 10, 44])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", type=int, default=500, help="number of 100-byte messages")
    parser.add_argument("--out", type=Path, default=Path("bench-results/transport.json"))
    args = parser.parse_args()
    if args.receiver:
        asyncio.run(run_receiver())
        return
    results = asyncio.run(run_sender(args))
    for mode in ("reuse_streams", "stream_per_message", "tcp"):
        print(mode, " ".join(f"{k}={v:.2f}" for k, v in results[mode].items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
