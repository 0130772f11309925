"""Benchmark the aggregation rules on ResNet-18-sized inputs: time (absolute and relative to `mean` in the same
run), iterations, reads of the input, and error against the honest mean, without and with an attack.

Inputs (n = 16 rows, float32). Honest rows g_i = μ + ξ_i with μ and ξ_i i.i.d. N(0, s²) and N(0, (2s)²) per
coordinate, s = 1/√11,200,000: over the full ResNet-18 (d = 11.2M) ‖μ‖ ≈ 1 and ‖ξ_i‖ ≈ 2, i.e. per-peer
minibatch noise twice the signal (batch 8 per peer); a part of d = 698k (one of 16 ButterflyClip parts) has the
same per-coordinate scale, so norms ≈ 0.25 and 0.5. Attack ("signflip"): rows 0..6 (7 of 16) are sent as
−1000 × their own honest gradient. Error = ‖result − mean of the honest rows‖ / ‖mean of the honest rows‖.

Usage: python benchmarks/aggregation.py [--quick] [--out bench-results/aggregation.json] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from btard.aggregation import centered_clip, coordinate_median, krum, mean, trimmed_mean, weiszfeld

N_PEERS = 16
N_BYZANTINE = 7
FULL_D = 11_200_000
FLIP_SCALE = -1000.0
SIZES = {"part": 698_000, "full": FULL_D}
QUICK_SIZES = {"part": 20_000, "full": 60_000}


@dataclass(frozen=True)
class Row:
    size: str
    d: int
    scenario: str
    rule: str
    time_s: float
    cpu_s: float
    x_mean: float
    cpu_x_mean: float
    iterations: int | None
    passes: int
    error: float
    repeats: int


def make_inputs(d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(honest rows, attacked rows): see the module docstring."""
    g = torch.Generator().manual_seed(seed)
    s = 1.0 / math.sqrt(FULL_D)
    honest = torch.randn(N_PEERS, d, generator=g).mul_(2 * s)
    honest.add_(torch.randn(d, generator=g).mul_(s))
    attacked = honest.clone()
    attacked[:N_BYZANTINE].mul_(FLIP_SCALE)
    return honest, attacked


# rule name → function returning (value, iterations or None, reads of the input)
RULES: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, int | None, int]]] = {
    "mean": lambda x: (mean(x), None, 1),
    "median": lambda x: (coordinate_median(x), None, 1),
    "trimmed-mean f=7": lambda x: (trimmed_mean(x, N_BYZANTINE), None, 1),
    "krum f=7": lambda x: (krum(x, N_BYZANTINE), None, 1),
    "geomedian": lambda x: (lambda r: (r.value, r.iterations, 2 + r.iterations))(weiszfeld(x)),
    "cclip tau=1": lambda x: (lambda r: (r.value, r.iterations, r.passes))(centered_clip(x, 1.0)),
    "cclip tau=10": lambda x: (lambda r: (r.value, r.iterations, r.passes))(centered_clip(x, 10.0)),
    "cclip adaptive": lambda x: (lambda r: (r.value, r.iterations, r.passes))(centered_clip(x, "adaptive")),
}


def measure(fn: Callable[[], tuple], repeats: int, budget_s: float) -> tuple[float, float, tuple, int]:
    """Median wall and CPU seconds over up to `repeats` runs (fewer once `budget_s` is spent; at least one)."""
    walls, cpus, out = [], [], ()
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        out = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
        if sum(walls) > budget_s:
            break
    return statistics.median(walls), statistics.median(cpus), out, len(walls)


def run(sizes: dict[str, int], repeats: int, budget_s: float, seed: int) -> list[Row]:
    rows: list[Row] = []
    for size, d in sizes.items():
        honest, attacked = make_inputs(d, seed)
        target = honest[N_BYZANTINE:].double().mean(dim=0)
        for scenario, x in (("honest", honest), ("signflip", attacked)):
            mean_wall = mean_cpu = None
            for rule, fn in RULES.items():
                wall, cpu, (value, iterations, passes), k = measure(
                    lambda fn=fn, x=x: fn(x), repeats, budget_s
                )
                if rule == "mean":
                    mean_wall, mean_cpu = wall, cpu
                error = float((value.double() - target).norm() / target.norm())
                row = Row(size, d, scenario, rule, wall, cpu, wall / mean_wall, cpu / max(mean_cpu, 1e-9),
                          iterations, passes, error, k)  # fmt: skip
                rows.append(row)
                print(f"  {size:4} {scenario:8} {rule:16} {wall:8.3f}s ×{row.x_mean:6.1f}", file=sys.stderr)
        del honest, attacked
    return rows


def markdown(rows: list[Row]) -> str:
    head = (
        "| d | scenario | rule | time (s) | × mean | CPU × mean | iterations | reads of x | error |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r.d:,} | {r.scenario} | {r.rule} | {r.time_s:.3f} | {r.x_mean:.1f} | {r.cpu_x_mean:.1f} | "
        f"{'' if r.iterations is None else r.iterations} | {r.passes} | {r.error:.3g} |\n"
        for r in rows
    )
    return head + body


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small d, for CI (checks the script runs)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/aggregation.json"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = QUICK_SIZES if args.quick else SIZES
    repeats = args.repeats or (2 if args.quick else 5)
    load_before = os.getloadavg()
    rows = run(sizes, repeats, budget_s=2.0 if args.quick else 60.0, seed=args.seed)
    table = markdown(rows)
    print(table)
    meta = {
        "n": N_PEERS,
        "byzantine": N_BYZANTINE,
        "threads": args.threads,
        "quick": args.quick,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))


if __name__ == "__main__":
    main()
