"""`btard peer`, `btard swarm` and `btard demo`: a real swarm of processes over libp2p.

btard peer --task mnist --min-peers 4 --steps 100            # start a swarm; prints the address to join
btard peer --task mnist --initial-peers /ip4/127.0.0.1/tcp/4321/p2p/12D3Koo...   # join it
btard swarm --peers 8 --byzantine 3 --attack sign-flip --steps 60              # a local swarm of processes
btard demo                                                                      # what `make demo` runs
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily at run time (torch, hivemind)
    from btard.swarm.peer import PeerOutcome, SwarmPeer

EXIT_CODES = {
    "finished": 0,
    "left": 0,
    "synced": 0,
    "banned": 3,
    "excluded": 4,
    "not-a-member": 5,
    "diverged": 6,
    "partitioned": 8,
    "state-rejected": 9,
}
EXIT_LAUNCHER_GONE = 7


def _kv(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _crash_at(text: str):
    from btard.protocol.state import Phase

    step, sep, phase = text.partition(":")
    try:
        return int(step), Phase[phase.upper()] if sep else Phase.COMMIT
    except (ValueError, KeyError):
        names = ", ".join(p.name.lower() for p in Phase if p not in (Phase.IDLE, Phase.DONE))
        raise argparse.ArgumentTypeError(f"expected STEP:PHASE with PHASE one of {names}") from None


def _read_allow_list(path: str) -> frozenset[bytes]:
    keys = set()
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key = bytes.fromhex(line)
            if len(key) != 32:
                raise ValueError(f"{path}: {line!r} is not a 32-byte hex public key")
            keys.add(key)
    return frozenset(keys)


def _add_protocol_args(p: argparse.ArgumentParser, steps: int, timeout: float) -> None:
    p.add_argument(
        "--task",
        default="mnist",
        help="task name (mnist, digits, cifar10-resnet18, tiny-lm) or module:factory",
    )
    p.add_argument(
        "--task-param",
        action="append",
        type=_kv,
        default=[],
        metavar="K=V",
        help="task config override (every peer must pass the same)",
    )
    p.add_argument("--steps", type=int, default=steps, help="train until this step")
    p.add_argument(
        "--phase-timeout",
        type=float,
        default=timeout,
        metavar="S",
        help="T, the unit of every phase deadline (a crash costs a step of up to 14·T); set by the "
        "peer that starts the swarm, adopted by the others",
    )
    p.add_argument("--validators", type=int, default=1, help="validators per step")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="K")


def register(sub) -> None:
    p = sub.add_parser("peer", help="join (or, without --initial-peers, start) a BTARD swarm over libp2p")
    _add_protocol_args(p, 100, 2.0)
    p.add_argument(
        "--initial-peers",
        nargs="*",
        default=[],
        metavar="MADDR",
        help="multiaddr(s) of a running peer; the first one is the run's coordinator "
        "('-': read them from stdin's first line)",
    )
    p.add_argument("--identity", metavar="KEYFILE", help="Ed25519 key file (created if missing)")
    p.add_argument("--run-name", default="btard", help="name of the run in the DHT")
    p.add_argument("--run-dir", default="runs/peer", help="metrics, audit log and checkpoints go here")
    p.add_argument("--min-peers", type=int, default=4, help="start training when this many peers are present")
    p.add_argument("--attack", help="be Byzantine: a registered attack name or module:Class")
    p.add_argument("--attack-param", action="append", type=_kv, default=[], metavar="K=V")
    p.add_argument("--attack-start", type=int, default=0, metavar="STEP")
    p.add_argument("--resume", metavar="DIR", help="continue from a checkpoint (or a run dir's newest)")
    p.add_argument("--allow-list", metavar="FILE", help="file of hex public keys: the only peers accepted")
    p.add_argument("--eval-every", type=int, default=0, metavar="K")
    p.add_argument("--eval-final", action="store_true", help="evaluate the final parameters on the test set")
    p.add_argument("--host-maddrs", nargs="*", default=["/ip4/127.0.0.1/tcp/0"], metavar="MADDR")
    p.add_argument("--announce-maddrs", nargs="*", default=None, metavar="MADDR")
    p.add_argument("--join-timeout", type=float, default=120.0, metavar="S")
    p.add_argument("--audit-parts", action="store_true", help="log gradient/aggregate parts too (large)")
    p.add_argument(
        "--sync-only",
        action="store_true",
        help="download the state from a member, verify its hash against the members' commitments, "
        "save a checkpoint and stop (without joining)",
    )
    p.add_argument(
        "--join-at-step",
        type=int,
        default=None,
        metavar="S",
        help="stay out of the genesis and join the running swarm once it reached step S",
    )
    p.add_argument(
        "--leave-at-step",
        type=int,
        default=None,
        metavar="S",
        help="leave the run gracefully after step S (SIGINT/SIGTERM also leave gracefully; a second one quits)",
    )
    p.add_argument(
        "--no-join",
        action="store_true",
        help="if the run started without this peer, stop (default: join it, observe one step, then "
        "contribute on probation)",
    )
    p.add_argument("--json", action="store_true", help="print events as JSON lines")
    p.add_argument(
        "--stdin-lifeline",
        action="store_true",
        help="exit as soon as stdin closes (a launcher's "
        "children die with it); with --initial-peers -, the address is stdin's first line",
    )
    p.add_argument(
        "--crash-at",
        type=_crash_at,
        metavar="STEP:PHASE",
        help="fault injection: kill -9 itself on reaching this phase of this step",
    )
    p.set_defaults(func=_cmd_peer)

    s = sub.add_parser("swarm", help="launch a local swarm of `btard peer` processes on loopback")
    _add_protocol_args(s, 60, 2.0)
    s.add_argument("--peers", type=int, default=8)
    s.add_argument("--byzantine", type=int, default=0, help="the last B peers run --attack")
    s.add_argument("--attack")
    s.add_argument("--attack-param", action="append", type=_kv, default=[], metavar="K=V")
    s.add_argument("--attack-start", type=int, default=0, metavar="STEP")
    s.add_argument("--eval-every", type=int, default=0, metavar="K", help="peer 0 evaluates every K steps")
    s.add_argument("--run-dir", default="runs/swarm")
    s.set_defaults(func=_cmd_swarm)

    d = sub.add_parser("demo", help="8 peers train MNIST on loopback while 3 Byzantine peers attack")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's)")
    d.add_argument("--run-dir", default="runs/demo")
    d.add_argument("--phase-timeout", type=float, default=None, metavar="S")
    d.set_defaults(func=_cmd_demo)


# ---------------------------------------------------------------------------------------------- btard peer
def _cmd_peer(args: argparse.Namespace) -> int:
    os.environ.setdefault("GOLOG_LOG_LEVEL", "error")  # p2pd's own logging
    import torch

    from btard.swarm.peer import PeerRunConfig, SwarmPeer
    from btard.training import get_task

    try:
        cfg = PeerRunConfig(
            task=args.task,
            task_overrides=dict(args.task_param),
            run_name=args.run_name,
            initial_peers=list(args.initial_peers),
            identity=args.identity,
            run_dir=args.run_dir,
            min_peers=args.min_peers,
            steps=args.steps,
            phase_timeout=args.phase_timeout,
            validators=args.validators,
            attack=args.attack,
            attack_params=dict(args.attack_param),
            attack_start=args.attack_start,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            allow_list=_read_allow_list(args.allow_list) if args.allow_list else None,
            eval_every=args.eval_every,
            eval_final=args.eval_final,
            join_timeout=args.join_timeout,
            host_maddrs=list(args.host_maddrs),
            announce_maddrs=args.announce_maddrs,
            audit_parts=args.audit_parts,
            crash_at=args.crash_at,
            sync_only=args.sync_only,
            join=not args.no_join,
            join_at_step=args.join_at_step,
            leave_at_step=args.leave_at_step,
        )
        task = get_task(cfg.task, **cfg.task_overrides)
    except (ValueError, TypeError, OSError) as e:
        print(f"btard peer: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # one peer per core share; this process is ours (a CLI entry point)
    task.apply_numerics()
    printer = _print_json if args.json else _print_human
    try:
        peer = SwarmPeer(cfg, task=task, on_event=printer)
        import btard.transport.p2p  # noqa: F401 - hivemind, imported (slowly) while nobody waits for us

        peer.warm_up()
        first_line = _watch_stdin() if args.stdin_lifeline else None
        if cfg.initial_peers == ["-"]:  # the address comes later (a launcher starts every peer at once)
            cfg.initial_peers = (first_line.get() if first_line else sys.stdin.readline()).split()
            if not cfg.initial_peers:
                raise ValueError("--initial-peers -: no address on stdin")
        outcome = asyncio.run(_run_leaving_on_signal(peer))
    except (ValueError, TimeoutError) as e:
        print(f"btard peer: {e}", file=sys.stderr)
        return 1
    code = EXIT_CODES.get(outcome.status, 1)
    # Everything is closed and written; skip the interpreter's teardown (torch's takes seconds on a busy
    # machine, which a launcher of many peers would wait for).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def _run_leaving_on_signal(peer: SwarmPeer) -> PeerOutcome:
    """Run the peer; the first SIGINT/SIGTERM makes it leave gracefully after the current step, a second one
    stops it at once. The handlers belong to this command's own event loop (this process is the peer)."""
    loop = asyncio.get_running_loop()
    hits = [0]

    def on_signal() -> None:
        hits[0] += 1
        if hits[0] == 1:
            peer.leave()
        else:
            os._exit(130)  # the conventional exit status of an interrupted command

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)
    return await peer.run()


def _watch_stdin() -> queue.Queue[str]:
    """Read stdin in a daemon thread; hand over its first line; exit the process at EOF (the launcher that
    holds the other end is gone, or is done with us)."""
    first: queue.Queue[str] = queue.Queue()

    def watch() -> None:
        for line in sys.stdin:
            first.put(line)
        first.put("")
        os._exit(EXIT_LAUNCHER_GONE)

    threading.Thread(target=watch, name="stdin-lifeline", daemon=True).start()
    return first


def _print_json(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _print_human(ev: dict) -> None:
    kind = ev["event"]
    if kind == "listening":
        if ev["coordinator"]:
            print(
                f"peer {ev['peer']} started a swarm; others join with:\n"
                f"  btard peer --initial-peers {ev['maddrs'][0]}"
            )
        else:
            print(f"peer {ev['peer']} listening on {ev['maddrs'][0]}")
    elif kind == "waiting":
        print(f"waiting for peers: {ev['present']}/{ev['needed']}")
    elif kind == "genesis":
        print(
            f"run {ev['run_id'][:8]} starts at step {ev['step']}: {len(ev['members'])} members, "
            f"phase timeout {ev['phase_timeout']} s"
        )
    elif kind == "step":
        print(format_step(ev))
    elif kind == "eval":
        print(f"  eval at step {ev['step']}: accuracy {ev['accuracy']:.4f} ({ev['examples']} examples)")
    elif kind == "done":
        acc = f", test accuracy {ev['accuracy']:.4f}" if ev.get("accuracy") is not None else ""
        why = f" ({ev['reason']})" if ev.get("reason") else ""
        print(f"{ev['status']} at step {ev['step']}{why}; H(x) {ev['params_hash'][:16]}{acc}")
    sys.stdout.flush()


def format_step(ev: dict, total: int | None = None) -> str:
    of = f"/{total}" if total else ""
    line = (
        f"step {ev['step'] + 1:4d}{of} | loss {ev['loss']:.4f} | active {ev['active']} | "
        f"{ev['step_seconds']:.2f} s"
    )
    events = [f"BANNED {b['peer']}: {b['reason']}" for b in ev["bans"]]
    events += [f"excluded {p} (silent)" for p in ev["excluded"]]
    return line + (" | " + "; ".join(events) if events else "")


# ---------------------------------------------------------------------------------------------- btard swarm
def _cmd_swarm(args: argparse.Namespace) -> int:
    from btard.swarm.launcher import PeerRole, SwarmConfig, run_and_report

    if not 0 <= args.byzantine < args.peers:
        print("btard swarm: need 0 <= --byzantine < --peers", file=sys.stderr)
        return 2
    if args.byzantine and not args.attack:
        print("btard swarm: --byzantine needs --attack", file=sys.stderr)
        return 2
    role = PeerRole(args.attack, dict(args.attack_param), args.attack_start, label=f"attack {args.attack}")
    cfg = SwarmConfig(
        peers=args.peers,
        roles={i: role for i in range(args.peers - args.byzantine, args.peers)},
        task=args.task,
        task_overrides=dict(args.task_param),
        steps=args.steps,
        phase_timeout=args.phase_timeout,
        validators=args.validators,
        run_dir=args.run_dir,
        checkpoint_every=args.checkpoint_every,
        eval_every=args.eval_every,
    )
    return run_and_report(cfg, title=f"BTARD swarm: {args.peers} peers, {args.byzantine} Byzantine")


def _cmd_demo(args: argparse.Namespace) -> int:
    from btard.swarm.launcher import demo_config, run_and_report

    cfg = demo_config(run_dir=args.run_dir, steps=args.steps, phase_timeout=args.phase_timeout)
    return run_and_report(cfg, title="BTARD demo: 8 peers train MNIST on loopback, 3 of them Byzantine")
