"""`btard simulate` and `btard experiment`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _parse_params(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--attack-param expects key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _cmd_simulate(args: argparse.Namespace) -> int:
    import torch

    from btard.sim.runner import SimConfig, Simulator

    torch.set_num_threads(args.threads)
    cfg = SimConfig(
        task=args.task,
        peers=args.peers,
        byzantine=args.byzantine,
        attack=args.attack,
        attack_params=_parse_params(args.attack_param),
        attack_start=args.attack_start,
        attack_every=args.attack_every,
        attack_stop=args.attack_stop,
        aggregator=args.aggregator,
        tau=args.tau if args.tau == "adaptive" else float(args.tau),
        validators=args.validators,
        steps=args.steps,
        seed=args.seed,
        eval_every=args.eval_every,
        out_dir=args.out,
    )
    sim = Simulator(cfg)
    print(f"task {sim.task.name}: {sim.task.data_source}")
    sim.run()
    s = sim.summary()
    print(
        f"final test accuracy: {s['final_accuracy']:.4f} ({cfg.aggregator}, attack: {cfg.attack or 'none'})"
    )
    for b in sim.ban_log:
        who = "Byzantine" if b["byzantine"] else "HONEST"
        print(f"  step {b['step']}: banned {b['peer']} ({who}): {b['reason']}")
    if s["byzantine_not_banned"]:
        print(f"  attackers never banned: {', '.join(s['byzantine_not_banned'])}")
    if args.out:
        print(f"run directory: {args.out} (metrics.jsonl, accuracy.png, summary.json, audit.jsonl)")
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    from btard.sim.experiment import ExperimentConfig, run_experiment

    cfg = ExperimentConfig.load(args.config)
    if args.steps is not None:
        cfg.steps = args.steps
    if args.jobs is not None:
        cfg.jobs = args.jobs
    run_experiment(cfg, Path(args.out))
    return 0


def register(sub) -> None:
    from btard.sim.runner import AGGREGATORS

    s = sub.add_parser("simulate", help="many peers in one process: BTARD or a baseline, under an attack")
    s.add_argument(
        "--task", default="mnist", help="mnist | digits | cifar10-resnet18 | tiny-lm | module:factory"
    )
    s.add_argument("--peers", type=int, default=16)
    s.add_argument("--byzantine", type=int, default=0)
    s.add_argument("--attack", default=None, help="attack name (see `btard attacks`) or module:Class")
    s.add_argument("--attack-param", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--attack-start", type=int, default=0)
    s.add_argument("--attack-every", type=int, default=1)
    s.add_argument("--attack-stop", type=int, default=None)
    s.add_argument("--aggregator", default="btard", choices=AGGREGATORS)
    s.add_argument("--tau", default="adaptive", help="CenteredClip radius: a number or 'adaptive'")
    s.add_argument("--validators", type=int, default=1)
    s.add_argument("--steps", type=int, default=100)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--eval-every", type=int, default=50)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--out", default=None, help="run directory for metrics, plot and audit log")
    s.set_defaults(func=_cmd_simulate)

    e = sub.add_parser("experiment", help="a grid of simulations with a comparison table and figure")
    e.add_argument("config", help="TOML or JSON experiment config")
    e.add_argument("--out", default="runs/experiment")
    e.add_argument("--steps", type=int, default=None, help="override the number of steps")
    e.add_argument("--jobs", type=int, default=None, help="runs in parallel")
    e.set_defaults(func=_cmd_experiment)

    a = sub.add_parser("attacks", help="list the built-in attacks")
    a.set_defaults(func=_cmd_attacks)


def _cmd_attacks(args: argparse.Namespace) -> int:
    from btard.attacks.registry import list_attacks

    print("gradient attacks:", ", ".join(list_attacks("gradient")))
    print("protocol attacks:", ", ".join(list_attacks("protocol")))
    print("your own: --attack my_module:MyAttack (see btard.attacks docs)")
    return 0
