"""Step time of the full BTARD protocol versus a plain butterfly mean, side by side on the same swarm.

Usage: python benchmarks/swarm_step.py [--quick] [--peers 4 8] [--dim 214090] [--rounds 8] [--out FILE]
(default output: bench-results/swarm_step.json)

n real processes on loopback, each with one `P2PTransport` and one `ProtocolDriver` (per-destination FIFO
queues, concurrent across destinations). Rounds alternate between the two methods on the same transports:

- butterfly: peer j receives part j of every gradient, averages it, sends the mean part to everyone (n−1 part
  messages out and in per peer, twice; no commits, no signatures beyond what the transport does);
- BTARD: one full `BtardPeer` step (commits, scatter, CenteredClip, aggregate commits, MPRNG, projections,
  digests, accusation round), validators=0 by default (a validator recomputes a gradient, which is task time).

Gradients are seeded Gaussian vectors of the model's size (default d = 214,090, the MNIST CNN of `btard demo`),
so both methods move the same bytes and the difference is the protocol's own cost. Before each round the
peers meet at a barrier (not timed); a round's time is the slowest peer's, from the barrier to its result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

MAGIC = b"BNCH"
READY, GO, PART, MEAN = 1, 2, 3, 4
_HEAD = struct.Struct("<4sBII")  # magic, kind, round, part index
RUN = "bench-swarm-step"


# ---------------------------------------------------------------------------------------------- one process
class BenchPeer:
    def __init__(self, index: int, n: int, dim: int, validators: int, phase_timeout: float) -> None:
        import torch

        from btard.crypto import Identity

        torch.set_num_threads(1)
        self.index, self.n, self.dim = index, n, dim
        self.identity = Identity.generate()
        self.me = self.identity.peer_id
        self.validators = validators
        self.phase_timeout = phase_timeout
        self.got: dict[tuple[int, int], dict[int, bytes]] = {}  # (kind, round) -> {part or sender: payload}
        self.changed: asyncio.Event | None = None

    def gradient(self, step: int, pid: bytes):
        import torch

        from btard.crypto import digest

        seed = int.from_bytes(digest("bench-gradient", step, pid)[:8], "little") >> 1
        return torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))

    def on_other(self, incoming) -> None:
        p = incoming.payload
        if p[:4] != MAGIC or len(p) < _HEAD.size:
            return
        _, kind, rnd, j = _HEAD.unpack_from(p)
        self.got.setdefault((kind, rnd), {})[j] = p[_HEAD.size :]
        assert self.changed is not None
        self.changed.set()

    async def wait_for(self, kind: int, rnd: int, count: int) -> dict[int, bytes]:
        assert self.changed is not None
        while len(self.got.get((kind, rnd), {})) < count:
            self.changed.clear()
            await self.changed.wait()
        return self.got.pop((kind, rnd))

    def frame(self, kind: int, rnd: int, j: int, data: bytes = b"") -> bytes:
        return _HEAD.pack(MAGIC, kind, rnd, j) + data

    async def barrier(self, rnd: int) -> None:
        """Everyone reports to peer 0; peer 0 releases everyone at once."""
        leader = self.members[0]
        if self.me == leader:
            await self.wait_for(READY, rnd, self.n - 1)
            for m in self.members[1:]:
                self.driver.send(m, self.frame(GO, rnd, 0))
        else:
            self.driver.send(leader, self.frame(READY, rnd, self.index))
            await self.wait_for(GO, rnd, 1)

    async def butterfly(self, rnd: int, g) -> None:
        import numpy as np
        import torch

        from btard.protocol.checks import part_bounds

        bounds = part_bounds(self.dim, self.n)
        mine = self.index
        for j, dest in enumerate(self.members):
            if dest != self.me:
                a, b = bounds[j]
                self.driver.send(dest, self.frame(PART, rnd, self.index, g[a:b].numpy().tobytes()))
        parts = await self.wait_for(PART, rnd, self.n - 1)
        a, b = bounds[mine]
        rows = [g[a:b]] + [torch.from_numpy(np.frombuffer(raw, dtype="<f4").copy()) for raw in parts.values()]
        mean = torch.stack(rows).mean(dim=0)
        for dest in self.members:
            if dest != self.me:
                self.driver.send(dest, self.frame(MEAN, rnd, mine, mean.numpy().tobytes()))
        means = await self.wait_for(MEAN, rnd, self.n - 1)
        out = torch.empty(self.dim)
        out[a:b] = mean
        for j, raw in means.items():
            lo, hi = bounds[j]
            out[lo:hi] = torch.from_numpy(np.frombuffer(raw, dtype="<f4").copy())

    async def run(self, rounds: int, initial: list[str]) -> dict:
        from btard.protocol.peer import BtardPeer, ProtocolConfig
        from btard.swarm.driver import ProtocolDriver
        from btard.transport.p2p import P2PConfig, P2PTransport

        self.changed = asyncio.Event()
        transport = await P2PTransport.create(
            P2PConfig(initial_peers=initial), protocol_id=self.me, sign=self.identity.sign
        )
        try:
            if self.index == 0:
                print(json.dumps({"maddrs": await transport.get_visible_maddrs()}), flush=True)
            await transport.announce(RUN)
            while len(records := await transport.list_peers(RUN)) < self.n:
                await asyncio.sleep(0.2)
            self.members = [r.protocol_id for r in records]
            self.index = self.members.index(self.me)  # part and barrier order: sorted protocol ids
            self.driver = ProtocolDriver(transport, on_other=self.on_other)
            self.driver.start()
            cfg = ProtocolConfig(
                run_id=b"bench-swarm-step",
                dim=self.dim,
                phase_timeout=self.phase_timeout,
                validators=self.validators,
            )
            peer = BtardPeer(self.identity, cfg, self.members, oracle=self.gradient)
            self.driver.attach(peer)
            await self.barrier(10**6)  # everyone is connected to peer 0 before round 0
            times: dict[str, list[float]] = {"butterfly": [], "btard": []}
            sent: dict[str, list[int]] = {"butterfly": [], "btard": []}
            phases: list[dict[str, float]] = []
            for rnd in range(rounds):
                for mode in ("butterfly", "btard"):
                    seq = 2 * rnd + (mode == "btard")
                    g = self.gradient(seq, self.me)
                    await self.barrier(seq)
                    before = self.driver.outbox.queued_bytes
                    start = time.monotonic()
                    if mode == "butterfly":
                        await self.butterfly(seq, g)
                    else:
                        _, timing = await self.driver.run_step(b"p" * 32, None if peer.is_validator else g)
                        phases.append(timing.durations())
                    times[mode].append(time.monotonic() - start)
                    sent[mode].append(self.driver.outbox.queued_bytes - before)
            await self.barrier(10**6 + 1)  # nobody closes while others still need its messages
            await self.driver.close()
            return {"times": times, "sent_bytes": sent, "phases": phases}
        finally:
            await transport.close()


def child_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    for name in ("--index", "--n", "--dim", "--rounds", "--validators"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--phase-timeout", type=float, required=True)
    a = p.parse_args(argv)
    bench = BenchPeer(a.index, a.n, a.dim, a.validators, a.phase_timeout)
    initial = [] if a.index == 0 else sys.stdin.readline().split()
    result = asyncio.run(bench.run(a.rounds, initial))
    print(json.dumps({"result": result}), flush=True)


# ---------------------------------------------------------------------------------------------- the driver
def measure(n: int, dim: int, rounds: int, validators: int, phase_timeout: float, timeout: float) -> dict:
    env = {**os.environ, "GOLOG_LOG_LEVEL": "error", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "child",
                "--index",
                str(i),
                "--n",
                str(n),
                "--dim",
                str(dim),
                "--rounds",
                str(rounds),
                "--validators",
                str(validators),
                "--phase-timeout",
                str(phase_timeout),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for i in range(n)
    ]
    try:
        first = json.loads(procs[0].stdout.readline())  # type: ignore[union-attr]
        for p in procs[1:]:
            p.stdin.write(" ".join(first["maddrs"]) + "\n")  # type: ignore[union-attr]
            p.stdin.close()  # type: ignore[union-attr]
        procs[0].stdin.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        results = []
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
            out = p.stdout.read()  # type: ignore[union-attr]
            results.append(json.loads(out.strip().splitlines()[-1])["result"])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    row: dict = {"n": n, "d": dim, "rounds": rounds, "validators": validators}
    for mode in ("butterfly", "btard"):
        per_round = [max(r["times"][mode][k] for r in results) for k in range(rounds)]
        sent = [statistics.mean(r["sent_bytes"][mode]) for r in results]
        row[mode] = {
            "median_s": statistics.median(per_round),
            "min_s": min(per_round),
            "max_s": max(per_round),
            "sent_bytes_per_peer": statistics.mean(sent),
        }
    row["ratio"] = row["btard"]["median_s"] / row["butterfly"]["median_s"]
    # Where a BTARD step's time goes: seconds in each phase, median over peers and rounds.
    names = {name for r in results for ph in r["phases"] for name in ph}
    row["btard"]["phase_median_s"] = {
        name: statistics.median(ph[name] for r in results for ph in r["phases"] if name in ph)
        for name in sorted(names)
    }
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 peers, d = 20,000, 3 rounds (a smoke run)")
    ap.add_argument("--peers", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--dim", type=int, default=214_090)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--validators", type=int, default=0)
    ap.add_argument("--phase-timeout", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=600.0, help="per configuration")
    ap.add_argument("--out", default="bench-results/swarm_step.json")
    args = ap.parse_args()
    if args.quick:
        args.peers, args.dim, args.rounds = [4], 20_000, 3
    rows = []
    head = f"{'n':>3} {'d':>8} | {'butterfly s':>11} {'BTARD s':>9} {'ratio':>6} | "
    print(head + f"{'MB/peer bfly':>12} {'MB/peer BTARD':>13}")
    for n in args.peers:
        row = measure(n, args.dim, args.rounds, args.validators, args.phase_timeout, args.timeout)
        rows.append(row)
        b, t = row["butterfly"], row["btard"]
        print(
            f"{n:>3} {args.dim:>8} | {b['median_s']:>11.3f} {t['median_s']:>9.3f} {row['ratio']:>6.2f} | "
            f"{b['sent_bytes_per_peer'] / 1e6:>12.3f} {t['sent_bytes_per_peer'] / 1e6:>13.3f}",
            flush=True,
        )
        print(
            "    BTARD phases (median s): "
            + ", ".join(f"{k} {v:.3f}" for k, v in t["phase_median_s"].items())
        )
    write_rows(rows, args.out)


def write_rows(rows: list[dict], path: str) -> None:
    """Write ``{"meta": machine, "rows": rows}`` as JSON (creating the folder) and say where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        child_main(sys.argv[2:])
    else:
        main()
