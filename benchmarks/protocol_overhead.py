"""Bytes and messages per peer per step: BTARD (measured) against a plain butterfly all-reduce (analytic).

Runs honest steps of the real protocol state machine over the in-memory network (btard.protocol.harness) and
counts every message each peer sends, split into gradient traffic (GRAD_PART, AGG_PART: what a plain butterfly
all-reduce also sends, here with BTARD's header and signature) and protocol traffic beyond the gradient parts
(commits, MPRNG, projections, digests, pulls, accusations). Per-peer numbers are averages over all n peers and
all measured steps (the step's validators send no gradient part, so they pull the average down).

The plain butterfly is not measured but computed: each peer sends its n − 1 foreign parts of its gradient and
its aggregated part to the n − 1 others, i.e. 2·(n − 1)/n · d · 4 bytes and 2·(n − 1) messages per peer per
step (float32, no headers). The headline ratio is protocol bytes / gradient bytes (both measured); the target
is ≤ 1 % at d = 11.2M (ResNet-18), n = 8, and independent of d.

Gradients are random float32 vectors (one per peer, ~45 MB each at d = 11.2M); every configuration is freed
before the next one, and its wall time and the process's peak RSS are recorded in the JSON.

Usage: python benchmarks/protocol_overhead.py [--quick] [--ns 4 8 16] [--ds 1000000 11173962] [--steps 2]
       [--out bench-results/protocol_overhead.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import struct
import time
from collections import Counter
from pathlib import Path

import torch

from btard.crypto import Identity
from btard.protocol.harness import Harness, build_peers
from btard.protocol.messages import Kind
from btard.protocol.peer import ProtocolConfig
from btard.transport.memory import MemoryNetwork

GRADIENT_KINDS = {Kind.GRAD_PART, Kind.AGG_PART}
RESNET18_D = 11_173_962
# magic "BTRD" | version u16 | kind u8 | ... (see btard.protocol.messages): the kind without decoding the body
_KIND_PREFIX = struct.Struct("<4sHB")


def message_kind(raw: bytes) -> Kind:
    return Kind(_KIND_PREFIX.unpack_from(raw)[2])


def butterfly_bytes(n: int, d: int) -> float:
    """Plain butterfly all-reduce, analytic: bytes each peer sends per step (float32 payload only)."""
    return 2 * (n - 1) / n * d * 4


def butterfly_msgs(n: int) -> int:
    """Plain butterfly all-reduce, analytic: messages each peer sends per step."""
    return 2 * (n - 1)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(
    n: int, d: int, steps: int = 2, num_projections: int = 4, validators: int = 1, warmup: int = 1
) -> dict:
    """Run `warmup` uncounted steps (step 0 has no validators: they are drawn from the previous step's r),
    then count `steps` steps."""
    t0 = time.perf_counter()
    idents = [Identity.from_seed(f"overhead-{n}-{i}".encode()) for i in range(n)]
    cfg = ProtocolConfig(
        run_id=b"overhead-bench-0", dim=d, validators=validators, num_projections=num_projections
    )
    gen = torch.Generator().manual_seed(n)
    grads = {i.peer_id: torch.randn(d, generator=gen, dtype=torch.float32) for i in idents}
    peers = build_peers(idents, cfg, oracle=lambda step, pid: grads[pid], seed=n)
    harness = Harness(peers, MemoryNetwork(n))
    msgs: Counter = Counter()
    byts: Counter = Counter()
    kinds: Counter = Counter()

    def on_send(src, ev):
        kind = message_kind(ev.raw)
        group = "gradient" if kind in GRADIENT_KINDS else "protocol"
        msgs[group] += len(ev.dests)
        byts[group] += len(ev.raw) * len(ev.dests)
        kinds[kind.name] += len(ev.dests)

    step_s = []
    for i in range(warmup + steps):
        harness.on_send = on_send if i >= warmup else None
        ts = time.perf_counter()
        results = harness.run_step(
            {p: None if peer.is_validator else grads[p] for p, peer in peers.items()}, b"p" * 32
        )
        if i >= warmup:
            step_s.append(time.perf_counter() - ts)
        if len(results) != n or any(r.verdicts for r in results.values()):
            raise RuntimeError(f"honest step did not finish cleanly at n={n}, d={d}")
    per = steps * n
    grad_b, proto_b = byts["gradient"] / per, byts["protocol"] / per
    bf_b = butterfly_bytes(n, d)
    row = {
        "n": n,
        "d": d,
        "steps": steps,
        "warmup_steps": warmup,
        "validators": validators,
        "num_projections": num_projections,
        "gradient_msgs": msgs["gradient"] / per,
        "gradient_bytes": grad_b,
        "protocol_msgs": msgs["protocol"] / per,
        "protocol_bytes": proto_b,
        "msgs": (msgs["gradient"] + msgs["protocol"]) / per,
        "overhead_pct": 100 * byts["protocol"] / max(byts["gradient"], 1),
        "protocol_msgs_by_kind": {
            k: v / per for k, v in sorted(kinds.items()) if Kind[k] not in GRADIENT_KINDS
        },
        "butterfly_bytes_analytic": bf_b,
        "butterfly_msgs_analytic": butterfly_msgs(n),
        "total_vs_butterfly": (grad_b + proto_b) / bf_b,
        "step_seconds": step_s,
        "wall_seconds": 0.0,
        "peak_rss_mb": 0.0,
    }
    grads.clear()
    peers.clear()
    del harness, results
    gc.collect()
    row["wall_seconds"] = time.perf_counter() - t0
    row["peak_rss_mb"] = peak_rss_mb()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (for CI)")
    ap.add_argument("--ns", type=int, nargs="+", help="peer counts (default 4 8 16; quick 4 8)")
    ap.add_argument(
        "--ds", type=int, nargs="+", help="dimensions (default 1M and 11,173,962; quick 10k 100k)"
    )
    ap.add_argument("--steps", type=int, default=2, help="protocol steps measured per configuration")
    ap.add_argument("--warmup", type=int, default=1, help="uncounted steps first (step 0 has no validators)")
    ap.add_argument("--projections", type=int, default=4, help="K, projections per part")
    ap.add_argument("--validators", type=int, default=1, help="m, validators per step")
    ap.add_argument("--out", default="bench-results/protocol_overhead.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ns = args.ns or ([4, 8] if args.quick else [4, 8, 16])
    ds = args.ds or ([10_000, 100_000] if args.quick else [1_000_000, RESNET18_D])
    t_all = time.perf_counter()
    rows = []
    for d in ds:
        for n in ns:
            rows.append(measure(n, d, args.steps, args.projections, args.validators, args.warmup))
            r = rows[-1]
            print(
                f"  measured n={n} d={d:,}: {r['wall_seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    print()
    print(
        "BTARD measured (full protocol, in-memory harness); plain butterfly analytic = 2(n−1)/n·d·4 B, 2(n−1) msgs"
    )
    print(
        "| d | n | btard gradient MB/peer | btard protocol KB/peer | btard msgs/peer (grad + protocol) "
        "| protocol / gradient bytes | butterfly MB/peer (analytic) | butterfly msgs/peer (analytic) "
        "| btard total / butterfly |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['d']:,} | {r['n']} | {r['gradient_bytes'] / 1e6:.2f} | {r['protocol_bytes'] / 1e3:.1f} | "
            f"{r['msgs']:.1f} ({r['gradient_msgs']:.1f} + {r['protocol_msgs']:.1f}) | "
            f"{r['overhead_pct']:.3f} % | {r['butterfly_bytes_analytic'] / 1e6:.2f} | "
            f"{r['butterfly_msgs_analytic']} | {r['total_vs_butterfly']:.4f} |"
        )
    meta = {
        "benchmark": "protocol_overhead",
        "quick": args.quick,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "num_projections": args.projections,
        "validators": args.validators,
        "torch_threads": 1,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "total_seconds": time.perf_counter() - t_all,
        "seconds_per_config": {f"n={r['n']},d={r['d']}": round(r["wall_seconds"], 2) for r in rows},
        "butterfly": "analytic: 2·(n−1)/n·d·4 bytes and 2·(n−1) messages per peer per step, float32, no headers",
        "per_peer": "averages over all n peers (validators included) and all measured steps",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwrote {args.out} ({meta['total_seconds']:.1f} s)")


if __name__ == "__main__":
    main()
