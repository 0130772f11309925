"""The aggregation benchmark runs end to end (--quick) and reports every rule, so it cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RULES = {
    "mean",
    "median",
    "trimmed-mean f=7",
    "krum f=7",
    "geomedian",
    "cclip tau=1",
    "cclip tau=10",
    "cclip adaptive",
}


def test_quick_benchmark_writes_every_row(tmp_path):
    out = tmp_path / "aggregation.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "aggregation.py"),
        "--quick",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {(r["size"], r["scenario"], r["rule"]) for r in rows} == {
        (size, scenario, rule)
        for size in ("part", "full")
        for scenario in ("honest", "signflip")
        for rule in RULES
    }
    by_key = {(r["size"], r["scenario"], r["rule"]): r for r in rows}
    for size in ("part", "full"):
        assert by_key[(size, "signflip", "mean")]["error"] > 100  # the attack breaks the mean ...
        assert by_key[(size, "signflip", "cclip adaptive")]["error"] < 1.0  # ... not adaptive CenteredClip
        assert by_key[(size, "honest", "mean")]["x_mean"] == 1.0
    assert all(r["time_s"] > 0 and r["passes"] >= 1 for r in rows)
    assert "| cclip adaptive |" in proc.stdout
