"""`btard simulate` and `btard experiment`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _int_at_least(lo: int):
    """An argparse type: an integer ≥ lo, or one clear error line."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer ≥ {lo}, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"expected an integer ≥ {lo}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _tau(text: str) -> float | str:
    if text == "adaptive":
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number or 'adaptive', got {text!r}")
    return value


def _one_line_errors(parser: argparse.ArgumentParser, command: str) -> None:
    """Make the subcommand's argument errors one line on stderr (no usage block), exit status 2."""

    def error(message: str):
        print(f"btard {command}: error: {message} (see btard {command} --help)", file=sys.stderr)
        raise SystemExit(2)

    parser.error = error  # type: ignore[method-assign]


def _fail(command: str, message: str, code: int) -> int:
    """One line on stderr, no traceback; `code` 2 for a refused configuration, 1 for a run that halted."""
    print(f"btard {command}: error: {message}", file=sys.stderr)
    return code


def _parse_params(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--attack-param expects key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _cmd_simulate(args: argparse.Namespace) -> int:
    import torch

    from btard.sim.runner import SimConfig, SimulationHalted, Simulator

    torch.set_num_threads(args.threads)
    try:
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
            tau=args.tau,
            validators=args.validators,
            steps=args.steps,
            seed=args.seed,
            eval_every=args.eval_every,
            out_dir=args.out,
        )
        sim = Simulator(cfg)
    except (ValueError, TypeError, ImportError, OSError) as e:  # a refused configuration, attack or task
        return _fail("simulate", str(e), 2)
    print(f"task {sim.task.name}: {sim.task.data_source}")
    try:
        sim.run()
    except SimulationHalted as e:
        return _fail("simulate", f"run halted: {e}", 1)
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

    try:
        cfg = ExperimentConfig.load(args.config)
        if args.steps is not None:
            cfg.steps = args.steps
        if args.jobs is not None:
            cfg.jobs = args.jobs
        cfg.validate()
    except (OSError, ValueError, TypeError) as e:
        return _fail("experiment", f"{args.config}: {e}", 2)
    run_experiment(cfg, Path(args.out))
    return 0


def register(sub) -> None:
    from btard.sim.runner import AGGREGATORS

    s = sub.add_parser("simulate", help="many peers in one process: BTARD or a baseline, under an attack")
    s.add_argument(
        "--task", default="mnist", help="mnist | digits | cifar10-resnet18 | tiny-lm | module:factory"
    )
    s.add_argument("--peers", type=_positive_int, default=16)
    s.add_argument("--byzantine", type=_non_negative_int, default=0)
    s.add_argument("--attack", default=None, help="attack name (see `btard attacks`) or module:Class")
    s.add_argument("--attack-param", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--attack-start", type=_non_negative_int, default=0)
    s.add_argument("--attack-every", type=_positive_int, default=1)
    s.add_argument("--attack-stop", type=_non_negative_int, default=None)
    s.add_argument("--aggregator", default="btard", choices=AGGREGATORS)
    s.add_argument("--tau", type=_tau, default="adaptive", help="CenteredClip radius: a number or 'adaptive'")
    s.add_argument(
        "--validators",
        type=_non_negative_int,
        default=1,
        help="validators per step m (they do not contribute: refused unless 2·byzantine < peers − m)",
    )
    s.add_argument("--steps", type=_positive_int, default=100)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--eval-every", type=_positive_int, default=50)
    s.add_argument("--threads", type=_positive_int, default=1)
    s.add_argument("--out", default=None, help="run directory for metrics, plot and audit log")
    s.set_defaults(func=_cmd_simulate)
    _one_line_errors(s, "simulate")

    e = sub.add_parser("experiment", help="a grid of simulations with a comparison table and figure")
    e.add_argument("config", help="TOML or JSON experiment config")
    e.add_argument("--out", default="runs/experiment")
    e.add_argument("--steps", type=_positive_int, default=None, help="override the number of steps")
    e.add_argument("--jobs", type=_positive_int, default=None, help="runs in parallel")
    e.set_defaults(func=_cmd_experiment)
    _one_line_errors(e, "experiment")

    a = sub.add_parser("attacks", help="list the built-in attacks")
    a.set_defaults(func=_cmd_attacks)


def _cmd_attacks(args: argparse.Namespace) -> int:
    from btard.attacks.registry import list_attacks

    print("gradient attacks:", ", ".join(list_attacks("gradient")))
    print("protocol attacks:", ", ".join(list_attacks("protocol")))
    print("your own: --attack my_module:MyAttack (see btard.attacks docs)")
    return 0
