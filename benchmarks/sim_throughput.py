"""Simulator throughput: honest n-peer BTARD simulator steps against training ONE model on the same global batch.

Three measurements on the same task (default: MNIST, its default per-peer batch), CPU, `--threads` torch threads:

* **simulator**: `btard.sim.runner.Simulator` with the full protocol (aggregator "btard", no attack, no
  Byzantine peers), `--peers` peers; s/step over `--steps` steps after `--warmup` uncounted steps (the first
  step loads the data and warms the caches). Evaluation is not timed (steps are driven with `Simulator.step`).
  The step is split by timing the simulator's own methods from the outside: gradient computation
  (`Simulator._gradients`: the task's vectorized per-peer gradients of all contributors), the protocol
  (`Harness.run_step`: commitments, butterfly parts, CenteredClip, MPRNG, projections, validation, digests),
  the training-loss probe (`Simulator._train_loss`, one forward pass), the optimizer step, and the rest.
* **gradients alone**: the task's per-peer gradient function (`Task.compute_gradients`) for all n peers at the
  same parameters, outside the simulator.
* **single model**: one model trained on the same global batch (n × per-peer batch) with the same task code:
  the task rebuilt with ``batch_size = n × b`` (same model, loss, optimizer), each step one
  `Task.compute_gradient` (sampling included) and one optimizer step.

Target: simulator s/step ≤ 1.3 × single-model s/step. The simulator is CPU-only (the protocol's messages and
checks work on CPU tensors), so there is no device flag.

All three run with the objects alive at their start frozen out of the cyclic garbage collector
(`btard.sim.runner.frozen_gc`, as `Simulator.run` does), so that no measurement pays for walking the ~300k
objects of torch and the data sets on every older-generation collection.

``--heavy`` adds the same three measurements for a compute-heavy task (default ``cifar10-resnet18``: the
paper's ResNet-18, d = 11.2M, batch 8 per peer; generated CIFAR-shaped data unless ``data_dir`` has the real
files), with ``--heavy-steps`` timed steps after one warm-up: there the gradients dominate the single-model
step, and the protocol's per-step cost is the memory-bound work on 11.2M-element parts (hashing, the K
projections per part, CenteredClip) rather than per-message handling. Its rows go to the JSON's ``heavy``.

Usage: python benchmarks/sim_throughput.py [--quick] [--task mnist] [--peers 16] [--steps 20] [--threads 1]
       [--heavy [--heavy-task cifar10-resnet18] [--heavy-steps 2]] [--out bench-results/sim_throughput.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from btard.sim.runner import SimConfig, Simulator, frozen_gc
from btard.training import get_task
from btard.training.seeds import batch_seed

PHASES = ("gradients", "protocol", "loss probe", "optimizer")
SUBPHASES = ("gradients: task.compute_gradients", "protocol: recomputed gradients")  # parts of a phase


class PhaseTimer:
    """Accumulates wall seconds of wrapped callables per phase while `active`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.active = False
        self.stack: list[str] = []

    def wrap(self, obj: object, attr: str, phase: str, inside: str | None = None) -> bool:
        """Shadow ``obj.attr`` with a timed version (instance attribute); False if it does not exist.
        With `inside`, only calls made while phase `inside` runs are counted (a sub-phase)."""
        fn = getattr(obj, attr, None)
        if not callable(fn):
            return False

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            counted = self.active and (inside is None or (bool(self.stack) and self.stack[-1] == inside))
            t0 = time.perf_counter()
            self.stack.append(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stack.pop()
                if counted:
                    self.seconds[phase] += time.perf_counter() - t0
                    self.calls[phase] += 1

        setattr(obj, attr, timed)
        return True


def timed_steps(fn: Callable[[int], object], warmup: int, steps: int) -> list[float]:
    """Call fn(0..warmup+steps−1) with the garbage collector's old objects frozen; wall seconds of the last
    `steps` calls."""
    out = []
    with frozen_gc():
        for t in range(warmup + steps):
            t0 = time.perf_counter()
            fn(t)
            if t >= warmup:
                out.append(time.perf_counter() - t0)
    return out


def stats(xs: list[float]) -> dict:
    return {"mean_s": statistics.fmean(xs), "median_s": statistics.median(xs), "min_s": min(xs), "n": len(xs)}


def measure_simulator(args: argparse.Namespace, overrides: dict) -> tuple[dict, Simulator]:
    cfg = SimConfig(
        task=args.task,
        task_overrides=overrides,
        peers=args.peers,
        byzantine=0,
        aggregator="btard",
        validators=args.validators,
        steps=args.warmup + args.steps,
        seed=0,
        eval_every=10**9,
        progress=False,
    )
    sim = Simulator(cfg)
    timer = PhaseTimer()
    wrapped = {
        "gradients": timer.wrap(sim, "_gradients", "gradients"),
        "protocol": sim.harness is not None and timer.wrap(sim.harness, "run_step", "protocol"),
        "loss probe": timer.wrap(sim, "_train_loss", "loss probe"),
        "optimizer": timer.wrap(sim.opt, "step", "optimizer"),
        "gradients: task.compute_gradients": timer.wrap(
            sim.task, "compute_gradients", "gradients: task.compute_gradients", inside="gradients"
        ),
        # gradients recomputed inside the protocol (validators; the simulator hands them its cached ones)
        "protocol: recomputed gradients": timer.wrap(
            sim.task, "compute_gradient", "protocol: recomputed gradients", inside="protocol"
        ),
    }

    def one(t: int) -> None:
        timer.active = t >= args.warmup
        sim.step(t)

    per_step = timed_steps(one, args.warmup, args.steps)
    total = sum(per_step)
    phases = {
        p: timer.seconds[p] / args.steps
        for p in ("gradients", SUBPHASES[0], "protocol", SUBPHASES[1], "loss probe", "optimizer")
        if wrapped.get(p)
    }
    phases["other"] = total / args.steps - sum(v for k, v in phases.items() if k in PHASES)
    return {
        **stats(per_step),
        "phases_s_per_step": phases,
        "phases_share": {k: v / (total / args.steps) for k, v in phases.items()},
        "phase_calls": dict(timer.calls),
        "phases_instrumented": wrapped,
        "contributors_per_step": statistics.fmean(m.active for m in sim.metrics) if sim.metrics else None,
        "validators": args.validators,
        "dim": sim.task.dim,
        "batch_per_peer": sim.task.batch_size,
        "data": sim.task.data_source,
    }, sim


def measure_gradients(args: argparse.Namespace, sim: Simulator) -> dict:
    task, params = sim.task, sim.params
    ids = sim.ids

    def one(t: int) -> None:
        seeds = [task.batch_seed(b"g" * 32, t, p) for p in ids]
        task.compute_gradients(params, seeds)

    return stats(timed_steps(one, args.warmup, args.steps))


def measure_single(args: argparse.Namespace, overrides: dict, per_peer_batch: int) -> dict:
    global_batch = args.peers * per_peer_batch
    task = get_task(args.task, **{**overrides, "batch_size": global_batch})
    state = {"params": task.initial_params()}
    opt = task.make_optimizer()
    grad_s: list[float] = []

    def one(t: int) -> None:
        t0 = time.perf_counter()
        g = task.compute_gradient(state["params"], batch_seed(b"s" * 32, t, b"single-model"))
        if t >= args.warmup:
            grad_s.append(time.perf_counter() - t0)
        state["params"] = opt.step(state["params"], g, t)

    per_step = timed_steps(one, args.warmup, args.steps)
    return {**stats(per_step), "gradient_mean_s": statistics.fmean(grad_s), "global_batch": global_batch}


def measure_task(args: argparse.Namespace) -> dict:
    """The three measurements for `args.task` (`args.steps` timed steps after `args.warmup`); prints the tables
    and returns the rows."""
    overrides = {} if args.batch is None else {"batch_size": args.batch}
    t0 = time.perf_counter()
    sim_row, sim = measure_simulator(args, overrides)
    grad_row = measure_gradients(args, sim)
    single_row = measure_single(args, overrides, sim.task.batch_size)
    del sim
    ratio = sim_row["mean_s"] / single_row["mean_s"]

    n, b = args.peers, sim_row["batch_per_peer"]
    print(
        f"task {args.task} (d = {sim_row['dim']:,}, data: {sim_row['data']}), {n} peers × batch {b} = global "
        f"batch {n * b}, {args.threads} torch thread(s), CPU, {args.steps} timed steps after {args.warmup} warm-up"
    )
    print("| what | s/step (mean) | s/step (median) | × single model |")
    print("|---|---|---|---|")
    rows = [
        (f"btard simulator, {n} peers, full protocol (m = {args.validators})", sim_row),
        (f"task gradients of {n} peers alone (Task.compute_gradients, outside the simulator)", grad_row),
        (f"single model, batch {n * b}", single_row),
    ]
    for label, r in rows:
        print(
            f"| {label} | {r['mean_s']:.4f} | {r['median_s']:.4f} | {r['mean_s'] / single_row['mean_s']:.2f} |"
        )
    print()
    print("Where the simulator's step goes (mean s/step, share):")
    print("| phase | s/step | share |")
    print("|---|---|---|")
    for k, v in sim_row["phases_s_per_step"].items():
        label = f"  of which {k.split(': ', 1)[1]}" if k in SUBPHASES else k
        print(f"| {label} | {v:.4f} | {100 * sim_row['phases_share'][k]:.1f} % |")
    print(f"\nsimulator / single model = {ratio:.2f}× (target ≤ 1.3×)\n")
    return {
        "task": args.task,
        "batch_per_peer": b,
        "global_batch": n * b,
        "steps": args.steps,
        "warmup": args.warmup,
        "seconds": time.perf_counter() - t0,
        "simulator": sim_row,
        "gradients_only": grad_row,
        "single_model": single_row,
        "ratio": ratio,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny run for CI: digits, 4 steps")
    ap.add_argument("--task", default=None, help="task name (default mnist; quick: digits)")
    ap.add_argument("--peers", type=int, default=16)
    ap.add_argument("--batch", type=int, default=None, help="per-peer batch (default: the task's)")
    ap.add_argument("--validators", type=int, default=1, help="m, validators per step (SimConfig default 1)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20; quick 4)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; quick 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument(
        "--heavy", action="store_true", help="also measure a compute-heavy task (see --heavy-task; minutes)"
    )
    ap.add_argument("--heavy-task", default="cifar10-resnet18", help="the compute-heavy task")
    ap.add_argument("--heavy-steps", type=int, default=2, help="its timed steps (after 1 warm-up)")
    ap.add_argument("--out", default="bench-results/sim_throughput.json")
    args = ap.parse_args()
    args.task = args.task or ("digits" if args.quick else "mnist")
    args.steps = args.steps or (4 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    torch.set_num_threads(args.threads)

    t_all = time.perf_counter()
    main_rows = measure_task(args)
    heavy = None
    if args.heavy:
        heavy_args = argparse.Namespace(
            **{**vars(args), "task": args.heavy_task, "batch": None, "steps": args.heavy_steps, "warmup": 1}
        )
        heavy = measure_task(heavy_args)

    n, b = args.peers, main_rows["batch_per_peer"]
    meta = {
        "benchmark": "sim_throughput",
        "quick": args.quick,
        "task": args.task,
        "peers": n,
        "batch_per_peer": b,
        "global_batch": n * b,
        "validators": args.validators,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.threads,
        "device": "cpu",
        "gc": "frozen during the measurements (btard.sim.runner.frozen_gc)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "total_seconds": time.perf_counter() - t_all,
    }
    result = {
        "meta": meta,
        "simulator": main_rows["simulator"],
        "gradients_only": main_rows["gradients_only"],
        "single_model": main_rows["single_model"],
        "ratio": main_rows["ratio"],
        "target_ratio": 1.3,
    }
    if heavy is not None:
        result["heavy"] = heavy
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out} ({meta['total_seconds']:.1f} s)")


if __name__ == "__main__":
    main()
