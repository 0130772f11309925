"""Tiny versions of the benchmarks run in `make test`, so none of them can rot."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_protocol_overhead_is_constant_in_d(tmp_path):
    out = tmp_path / "overhead.json"
    run("protocol_overhead.py", "--quick", "--out", str(out))
    rows = json.loads(out.read_text())
    by_n: dict[int, set[float]] = {}
    for r in rows:
        by_n.setdefault(r["n"], set()).add(round(r["protocol_bytes"], -3))
    for n, sizes in by_n.items():
        small, large = sorted(sizes)[0], sorted(sizes)[-1]
        assert large <= small * 1.05 + 2000, f"protocol bytes grow with d at n={n}: {sizes}"


def test_transport_benchmark_runs(tmp_path):
    out = tmp_path / "transport.json"
    run("transport.py", "--sizes-mb", "1", "--repeats", "1", "--tiny", "20", "--out", str(out))
    assert json.loads(out.read_text())
