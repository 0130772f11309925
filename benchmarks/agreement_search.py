"""Search for schedules that split the honest peers' views (issue 10): the long run of the adversarial scheduler.

Runs seeded schedules of `btard.protocol.adversary` (n peers, b Byzantine, a few steps each) for every strategy
family, checks the agreement property after each step and prints, per strategy, how many schedules split the
honest views, banned an honest peer, excluded one, made an honest peer crash or hang, and the first failing
seeds (rerun one with ``--show STRATEGY:SEED``, which also shrinks it to a minimal counterexample).

Usage: python benchmarks/agreement_search.py [--schedules 5000] [--peers 5] [--byzantine 2] [--steps 2]
       [--strategies withhold equivocate ...] [--seed-start 0] [--workers 2] [--out FILE]
(default output: bench-results/agreement_search.json)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import swarm_step  # noqa: E402
from btard.protocol.adversary import STRATEGIES, Schedule, minimize, run_schedule  # noqa: E402

KINDS = ("split", "honest-ban", "honest-exclusion", "partitioned", "crash", "stuck")


def _run(schedule: Schedule) -> tuple[int, list[str], float]:
    torch.set_num_threads(1)
    out = run_schedule(schedule)
    return schedule.seed, sorted({f.kind for f in out.failures}), out.seconds


def search(strategy: str, seeds: range, args: argparse.Namespace, pool: ProcessPoolExecutor | None) -> dict:
    """Run `strategy` on every seed; returns one table row."""
    scheds = [
        Schedule(
            seed=s,
            strategy=strategy,
            n=args.peers,
            byzantine=args.byzantine,
            steps=args.steps,
            dim=args.dim,
        )
        for s in seeds
    ]
    t0 = time.perf_counter()
    runs = list(pool.map(_run, scheds, chunksize=8)) if pool else [_run(s) for s in scheds]
    row: dict = {
        "strategy": strategy,
        "schedules": len(scheds),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    for k in KINDS:
        hits = [seed for seed, kinds, _ in runs if k in kinds]
        row[k] = len(hits)
        row[f"{k}_seeds"] = hits[:10]
    row["failed"] = sum(1 for _, kinds, _ in runs if set(kinds) - {"honest-exclusion"})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--schedules", type=int, default=5000, help="schedules in all (split over the strategies)"
    )
    ap.add_argument("--peers", type=int, default=5)
    ap.add_argument("--byzantine", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="steps per schedule")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--strategies", nargs="+", default=[s for s in STRATEGIES if s != "honest"])
    ap.add_argument("--seed-start", type=int, default=0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--show", help="STRATEGY:SEED: rerun one schedule, shrink it and print the counterexample"
    )
    ap.add_argument("--out", default="bench-results/agreement_search.json")
    args = ap.parse_args()
    if args.show:
        strategy, seed = args.show.rsplit(":", 1)
        sched = Schedule(int(seed), strategy, args.peers, args.byzantine, args.steps, args.dim)
        out = run_schedule(sched)
        print(out.describe())
        if out.failed:
            print("\nshrunk:\n" + minimize(out).describe())
        return
    per = max(1, args.schedules // len(args.strategies))
    seeds = range(args.seed_start, args.seed_start + per)
    print(
        f"{per} schedules per strategy, n={args.peers}, b={args.byzantine}, {args.steps} steps, "
        f"d={args.dim}, {args.workers} workers",
        flush=True,
    )
    rows = []
    pool = ProcessPoolExecutor(args.workers) if args.workers > 1 else None
    try:
        for strategy in args.strategies:
            rows.append(search(strategy, seeds, args, pool))
            r = rows[-1]
            print(
                f"  {strategy}: {r['failed']} failing of {r['schedules']} ({r['seconds']:.0f} s)", flush=True
            )
    finally:
        if pool:
            pool.shutdown()
    print()
    print(
        "| strategy | schedules | splits | honest bans | honest exclusions | crashes/stuck | time (s) | example seeds |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        examples = sorted(set(r["split_seeds"][:3] + r["honest-ban_seeds"][:3] + r["crash_seeds"][:2]))
        print(
            f"| {r['strategy']} | {r['schedules']} | {r['split']} | {r['honest-ban']} | {r['honest-exclusion']} "
            f"| {r['crash'] + r['stuck']} | {r['seconds']:.1f} | {', '.join(map(str, examples)) or '-'} |"
        )
    total = sum(r["schedules"] for r in rows)
    print(f"\n{total} schedules, {sum(r['failed'] for r in rows)} violate the property")
    for r in rows:
        r.update(peers=args.peers, byzantine=args.byzantine, steps=args.steps, dim=args.dim)
    swarm_step.write_rows(rows, args.out)


if __name__ == "__main__":
    main()
