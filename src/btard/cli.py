"""The `btard` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_audit(args: argparse.Namespace) -> int:
    from btard.protocol.audit import verify_log

    try:
        with open(args.log) as f:
            lines = [ln.rstrip("\n") for ln in f if ln.strip()]
    except OSError as e:
        print(f"btard audit: cannot read {args.log}: {e}", file=sys.stderr)
        return 2
    report = verify_log(lines)
    print(report.summary())
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="btard", description="Byzantine-tolerant collaborative training (BTARD-SGD)"
    )
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("audit", help="verify a peer's audit log offline (signatures, commitments, bans, r^t)")
    a.add_argument("log", help="path of an audit log (JSON lines)")
    a.set_defaults(func=_cmd_audit)
    _register_optional(sub)
    return p


def _register_optional(sub) -> None:
    """Subcommands that live in other subsystems register themselves here (keeps imports lazy)."""
    try:
        from btard.sim.cli import register as register_sim
    except ImportError:
        register_sim = None
    if register_sim is not None:
        register_sim(sub)
    try:
        from btard.swarm.cli import register as register_swarm
    except ImportError:
        register_swarm = None
    if register_swarm is not None:
        register_swarm(sub)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
