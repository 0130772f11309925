from __future__ import annotations

import subprocess
import sys

from btard.attacks import protocol as pa

from .protocol.conftest import make_swarm


def test_btard_audit_accepts_a_good_log_and_rejects_a_tampered_one(tmp_path):
    swarm = make_swarm(4, seed=2, behaviours={3: pa.NaNPart()}, validators=1)
    for _ in range(2):
        swarm.step()
    lines = swarm.audits[swarm.ids[0]].lines
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(lines) + "\n")
    out = subprocess.run(
        [sys.executable, "-m", "btard.cli", "audit", str(good)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "audit OK" in out.stdout and "1 bans re-derived" in out.stdout
    bad = tmp_path / "bad.jsonl"
    tampered = [ln.replace('"reason":"nonfinite"', '"reason":"commit-mismatch"') for ln in lines]
    bad.write_text("\n".join(tampered) + "\n")
    out = subprocess.run(
        [sys.executable, "-m", "btard.cli", "audit", str(bad)], capture_output=True, text=True
    )
    assert out.returncode == 1 and "FAILED" in out.stdout
