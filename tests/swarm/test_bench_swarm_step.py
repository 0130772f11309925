"""The swarm step benchmark runs end to end (--quick: 4 processes, d = 20,000), so it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import ROOT


@pytest.mark.timeout(120)
def test_quick_benchmark_compares_both_methods(tmp_path):
    out = tmp_path / "swarm_step.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "swarm_step.py"), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["n"], row["d"], row["rounds"]) == (4, 20_000, 3)
    bfly, btard = row["butterfly"], row["btard"]
    assert bfly["median_s"] > 0 and btard["median_s"] > 0
    # Both move the gradient parts: 2·(n−1)/n·d floats per peer; BTARD adds small messages on top.
    parts = 2 * 3 / 4 * 20_000 * 4
    assert parts <= bfly["sent_bytes_per_peer"] < 1.05 * parts
    assert bfly["sent_bytes_per_peer"] < btard["sent_bytes_per_peer"] < 2 * parts


@pytest.mark.timeout(300)
def test_quick_allreduce_table_has_every_system_against_the_butterfly(tmp_path):
    out = tmp_path / "allreduce.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "allreduce.py"), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["n"], row["d"]) == (4, 20_000)
    assert row["butterfly"]["ratio_to_butterfly"] == 1.0
    for system in ("btard", "hivemind", "gloo"):
        assert row[system]["median_s"] > 0
        assert row[system]["ratio_to_butterfly"] == row[system]["median_s"] / row["butterfly"]["median_s"]
    assert set(row["btard"]["phase_median_s"]) >= {"COMMIT", "SCATTER", "AGGREGATE", "PROJ", "ACCUSE"}
