"""All-reduce baselines on loopback: torch.distributed gloo `all_reduce` and hivemind's DecentralizedAverager.

Each of n peers is its own process holding a d-float tensor; every round all peers start together (a barrier)
and the round ends when the slowest peer has the averaged tensor. Prints a table (median seconds per round)
and writes JSON. btard's own step and the plain butterfly over the same transport are measured by
`benchmarks/swarm_step.py`; the README puts them side by side.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank: int, n: int, d: int, rounds: int, port: int, out: mp.Queue) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n)
    x = torch.randn(d)
    times = []
    for _ in range(rounds + 1):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(x)
        x /= n
        dist.barrier()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        out.put(times[1:])  # the first round warms up connections
    dist.destroy_process_group()


def bench_gloo(n: int, d: int, rounds: int) -> list[float]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_gloo_worker, args=(r, n, d, rounds, port, q)) for r in range(n)]
    for p in procs:
        p.start()
    times = q.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
    return times


def _hivemind_worker(rank: int, n: int, d: int, rounds: int, maddrs, out: mp.Queue, ready) -> None:
    import torch

    torch.set_num_threads(1)
    import hivemind

    if rank == 0:
        dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        for a in dht.get_visible_maddrs():
            maddrs.append(str(a))
        ready.set()
    else:
        ready.wait()
        dht = hivemind.DHT(start=True, initial_peers=list(maddrs), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    x = torch.randn(d)
    avg = hivemind.averaging.DecentralizedAverager(
        [x],
        dht,
        start=True,
        prefix="bench",
        target_group_size=n,
        min_group_size=n,
        min_matchmaking_time=1.0,
        request_timeout=0.5,
    )
    times = []
    for _ in range(rounds + 1):
        t0 = time.perf_counter()
        avg.step(timeout=300)
        times.append(time.perf_counter() - t0)
    out.put((rank, times[1:]))
    time.sleep(2)
    avg.shutdown()
    dht.shutdown()


def bench_hivemind(n: int, d: int, rounds: int) -> list[float]:
    ctx = mp.get_context("fork")  # hivemind's DHT and averager are fork-based processes themselves
    q = ctx.Queue()
    mgr = ctx.Manager()
    maddrs = mgr.list()
    ready = mgr.Event()
    procs = [ctx.Process(target=_hivemind_worker, args=(r, n, d, rounds, maddrs, q, ready)) for r in range(n)]
    for p in procs:
        p.start()
    per_rank = dict(q.get(timeout=900) for _ in range(n))
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    # a round ends when the slowest peer finished it
    return [max(per_rank[r][i] for r in per_rank) for i in range(rounds)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--dims", type=int, nargs="+", default=[1_000_000, 11_173_962])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--systems", nargs="+", default=["gloo", "hivemind"])
    ap.add_argument("--out", default="bench-results/allreduce_baselines.json")
    args = ap.parse_args()
    rows = []
    for n in args.peers:
        for d in args.dims:
            for system in args.systems:
                fn = bench_gloo if system == "gloo" else bench_hivemind
                times = fn(n, d, args.rounds)
                rows.append(
                    {"system": system, "n": n, "d": d, "median_s": statistics.median(times), "rounds": times}
                )
                print(f"{system:>9} n={n} d={d:,}: median {statistics.median(times):.3f} s/round", flush=True)
    print("\n| system | n | d | median s/round |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['system']} | {r['n']} | {r['d']:,} | {r['median_s']:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
