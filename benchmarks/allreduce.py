"""All-reduce step side by side: btard's full protocol, a plain butterfly mean over the same transport,
hivemind's DecentralizedAverager and torch.distributed gloo `all_reduce`, on loopback, one run.

Usage: python benchmarks/allreduce.py [--quick] [--peers 4 8] [--dims 1000000 11173962] [--rounds 5]
(default output: bench-results/allreduce.json)

For each (n, d) the four systems run one after the other on the same machine with the same tensor size;
btard and the butterfly alternate round by round on the same processes and transports
(`swarm_step.measure`), hivemind and gloo use `allreduce_baselines`. Every figure is the median seconds per
round (a round ends when the slowest peer has the result) and its ratio to the plain butterfly measured in
the same run. hivemind's round includes its matchmaking (min_matchmaking_time = 1 s), which it needs for
every averaging round; btard's membership is fixed per step by the protocol itself.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import allreduce_baselines  # noqa: E402
import swarm_step  # noqa: E402


def run(n: int, d: int, rounds: int, systems: list[str], phase_timeout: float) -> dict:
    row: dict = {"n": n, "d": d, "rounds": rounds}
    t0 = time.monotonic()
    both = swarm_step.measure(n, d, rounds, 0, phase_timeout, timeout=900.0)
    for mode in ("btard", "butterfly"):
        row[mode] = {
            "median_s": both[mode]["median_s"],
            "sent_bytes_per_peer": both[mode]["sent_bytes_per_peer"],
        }
    row["btard"]["phase_median_s"] = both["btard"]["phase_median_s"]
    for system in systems:
        fn = allreduce_baselines.bench_gloo if system == "gloo" else allreduce_baselines.bench_hivemind
        row[system] = {"median_s": statistics.median(fn(n, d, rounds))}
    base = row["butterfly"]["median_s"]
    for key in ("btard", "butterfly", *systems):
        row[key]["ratio_to_butterfly"] = row[key]["median_s"] / base
    row["wall_s"] = round(time.monotonic() - t0, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="n = 4, d = 20,000, 2 rounds (smoke run)")
    ap.add_argument("--peers", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--dims", type=int, nargs="+", default=[1_000_000, 11_173_962])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--systems", nargs="+", default=["hivemind", "gloo"], choices=["hivemind", "gloo"])
    ap.add_argument("--phase-timeout", type=float, default=30.0)
    ap.add_argument("--out", default="bench-results/allreduce.json")
    args = ap.parse_args()
    if args.quick:
        args.peers, args.dims, args.rounds = [4], [20_000], 2
    systems = ["btard", "butterfly", *args.systems]
    print("| n | d | " + " | ".join(f"{s} s (×bfly)" for s in systems) + " | btard / bfly MB per peer |")
    print("|---|---|" + "---|" * len(systems) + "---|")
    rows = []
    for n in args.peers:
        for d in args.dims:
            row = run(n, d, args.rounds, args.systems, args.phase_timeout)
            rows.append(row)
            cells = [f"{row[s]['median_s']:.3f} ({row[s]['ratio_to_butterfly']:.2f})" for s in systems]
            sent = [row[k]["sent_bytes_per_peer"] / 1e6 for k in ("btard", "butterfly")]
            mb = f"{sent[0]:.2f} / {sent[1]:.2f}"
            print(f"| {n} | {d:,} | " + " | ".join(cells) + f" | {mb} |", flush=True)
    swarm_step.write_rows(rows, args.out)


if __name__ == "__main__":
    main()
