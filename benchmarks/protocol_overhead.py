"""Messages and bytes per peer per step that BTARD adds beyond the gradient parts, as a function of n and d.

Runs honest steps of the real protocol state machine over the in-memory network and counts every message one
peer sends, split into gradient traffic (GRAD_PART, AGG_PART: what a plain butterfly all-reduce also sends)
and protocol overhead (commits, MPRNG, projections, digests, pulls, accusations). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from btard.crypto import Identity
from btard.protocol.harness import Harness, build_peers
from btard.protocol.messages import Kind, decode
from btard.protocol.peer import ProtocolConfig
from btard.transport.memory import MemoryNetwork

GRADIENT_KINDS = {Kind.GRAD_PART, Kind.AGG_PART}


def measure(n: int, d: int, steps: int = 2, num_projections: int = 4) -> dict:
    idents = [Identity.from_seed(f"overhead-{n}-{i}".encode()) for i in range(n)]
    cfg = ProtocolConfig(run_id=b"overhead-bench-0", dim=d, validators=1, num_projections=num_projections)
    gen = torch.Generator().manual_seed(n)
    grads = {i.peer_id: torch.randn(d, generator=gen) for i in idents}
    peers = build_peers(idents, cfg, oracle=lambda step, pid: grads[pid], seed=n)
    harness = Harness(peers, MemoryNetwork(n))
    msgs: Counter = Counter()
    byts: Counter = Counter()

    def on_send(src, ev):
        kind = decode(ev.raw).msg.kind
        group = "gradient" if kind in GRADIENT_KINDS else "protocol"
        msgs[group] += len(ev.dests)
        byts[group] += len(ev.raw) * len(ev.dests)

    harness.on_send = on_send
    for _ in range(steps):
        harness.run_step({p: None if peer.is_validator else grads[p] for p, peer in peers.items()}, b"p" * 32)
    per = steps * n
    return {
        "n": n,
        "d": d,
        "gradient_msgs": msgs["gradient"] / per,
        "gradient_bytes": byts["gradient"] / per,
        "protocol_msgs": msgs["protocol"] / per,
        "protocol_bytes": byts["protocol"] / per,
        "overhead_pct": 100 * byts["protocol"] / max(byts["gradient"], 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes (for CI)")
    ap.add_argument("--out", default="bench-results/protocol_overhead.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ns = [4, 8] if args.quick else [4, 8, 16]
    ds = [10_000, 100_000] if args.quick else [100_000, 1_000_000]
    rows = [measure(n, d) for n in ns for d in ds]
    print(
        "| n | d | gradient msgs/peer | gradient MB/peer | protocol msgs/peer | protocol KB/peer | overhead % |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['n']} | {r['d']:,} | {r['gradient_msgs']:.0f} | {r['gradient_bytes'] / 1e6:.2f} | "
            f"{r['protocol_msgs']:.0f} | {r['protocol_bytes'] / 1e3:.1f} | {r['overhead_pct']:.3f} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
