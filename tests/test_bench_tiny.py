"""Tiny versions of the benchmarks run in `make test`, so none of them can rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert report["meta"]["total_seconds"] > 0
    assert {(r["n"], r["d"]) for r in rows} == {(n, d) for n in (4, 8) for d in (10_000, 100_000)}
    by_n: dict[int, set[float]] = {}
    for r in rows:
        by_n.setdefault(r["n"], set()).add(round(r["protocol_bytes"], -3))
        n, d = r["n"], r["d"]
        assert r["butterfly_bytes_analytic"] == 2 * (n - 1) / n * d * 4
        assert r["butterfly_msgs_analytic"] == 2 * (n - 1)
        # the parts themselves: at least the contributors' share of a butterfly, at most a butterfly + headers
        assert 0.5 * r["butterfly_bytes_analytic"] < r["gradient_bytes"] < 1.1 * r["butterfly_bytes_analytic"]
        assert r["protocol_msgs"] > r["gradient_msgs"] > 0
        assert r["overhead_pct"] == pytest.approx(100 * r["protocol_bytes"] / r["gradient_bytes"])
    for n, sizes in by_n.items():
        small, large = sorted(sizes)[0], sorted(sizes)[-1]
        assert large <= small * 1.05 + 2000, f"protocol bytes grow with d at n={n}: {sizes}"
    # so the ratio falls ~1/d
    for n in (4, 8):
        small_d, large_d = (next(r for r in rows if r["n"] == n and r["d"] == d) for d in (10_000, 100_000))
        assert large_d["overhead_pct"] < small_d["overhead_pct"] / 5


def test_transport_benchmark_runs(tmp_path):
    out = tmp_path / "transport.json"
    run("transport.py", "--sizes-mb", "1", "--repeats", "1", "--tiny", "20", "--out", str(out))
    assert json.loads(out.read_text())


def test_sim_throughput_quick(tmp_path):
    out = tmp_path / "sim_throughput.json"
    run("sim_throughput.py", "--quick", "--out", str(out), timeout=180)
    r = json.loads(out.read_text())
    assert r["meta"]["task"] == "digits" and r["meta"]["peers"] == 16
    assert r["meta"]["global_batch"] == 16 * r["meta"]["batch_per_peer"]
    sim, grads, single = r["simulator"], r["gradients_only"], r["single_model"]
    for part in (sim, grads, single):
        assert part["n"] == r["meta"]["steps"] and part["mean_s"] > 0
    assert r["ratio"] == pytest.approx(sim["mean_s"] / single["mean_s"])
    # the simulator does strictly more than computing the peers' gradients (the whole protocol on top)
    assert sim["mean_s"] > grads["mean_s"] and r["ratio"] > 1
    # the breakdown still hooks the simulator's phases, and the phases add up to the step
    assert all(sim["phases_instrumented"][p] for p in ("gradients", "protocol", "loss probe", "optimizer"))
    phases = sim["phases_s_per_step"]
    assert phases["protocol"] > 0 and phases["gradients"] > 0
    main = sum(phases[p] for p in ("gradients", "protocol", "loss probe", "optimizer"))
    assert main + phases["other"] == pytest.approx(sim["mean_s"])
    assert main <= sim["mean_s"] * 1.001


def test_robustness_quick_grid(tmp_path):
    out = tmp_path / "robustness.json"
    run("robustness.py", "--quick", "--out", str(out), timeout=300)
    r = json.loads(out.read_text())
    assert r["defenses"] == ["btard", "mean"]
    assert r["attacks"] == ["none", "sign-flip", "random-direction"]
    assert "| sign-flip |" in r["markdown"]
    rows = {row["attack"]: row for row in r["rows"]}
    assert rows["none"]["accuracy"]["btard"] > 0.5  # digits: 10 classes
    assert rows["none"]["bans"]["btard"]["honest_banned"] == 0
    for attack in ("sign-flip", "random-direction"):
        row = rows[attack]
        acc = row["accuracy"]
        assert acc["btard"] > 0.5, f"btard under {attack}: {acc}"  # chance is 0.1
        assert acc["mean"] < 0.3, f"the undefended mean should collapse under {attack}: {acc}"
        assert row["btard_delta_pt"] is not None
        bans = row["bans"]["btard"]
        assert bans["banned"] == bans["byzantine"] == 3 and not bans["not_banned"]
        assert bans["honest_banned"] == 0
        assert r["attack_start"] <= bans["first_ban_step"] <= bans["last_ban_step"] < r["config"]["steps"]
        assert bans["first_ban_after_attack"] == bans["first_ban_step"] - r["attack_start"]
        assert bans["ban_steps"] == sorted(bans["ban_steps"]) and len(bans["ban_steps"]) == 3


def test_robustness_reads_an_experiment_dir(tmp_path):
    """--from on a hand-written results.json (the `btard experiment` format): no simulation, exact numbers."""

    def summary(attack, defense, acc, banned=None, honest=()):
        return {
            "attack": attack,
            "defense": defense,
            "aggregator": defense,
            "seed": 0,
            "byzantine": 2 if attack != "none" else 0,
            "final_accuracy": acc,
            "byzantine_banned": banned or {},
            "byzantine_not_banned": ["cc"] if banned and len(banned) < 2 else [],
            "honest_banned": list(honest),
            "curve": [[10, acc]],
        }

    runs = [
        summary("none", "btard", 0.9),
        summary("none", "mean", 0.91),
        summary("sign-flip", "btard", 0.88, {"aa": 7, "bb": 9}),
        summary("sign-flip", "mean", 0.1),
        summary("alie", "btard", 0.5, {"aa": 12}, [{"step": 11, "peer": "dd", "byzantine": False}]),
        summary("alie", "mean", 0.2),
    ]
    config = {
        "task": "t",
        "peers": 6,
        "byzantine": 2,
        "steps": 20,
        "attack_start": 5,
        "defenses": ["btard", "mean"],
    }
    grid = tmp_path / "grid"
    grid.mkdir()
    (grid / "results.json").write_text(json.dumps({"config": config, "runs": runs}))
    out = tmp_path / "robustness.json"
    proc = run("robustness.py", "--from", str(grid), "--out", str(out), timeout=60)
    r = json.loads(out.read_text())
    rows = {row["attack"]: row for row in r["rows"]}
    assert [row["attack"] for row in r["rows"]] == ["none", "sign-flip", "alie"]
    sf = rows["sign-flip"]
    assert sf["accuracy"] == {"btard": 0.88, "mean": 0.1}
    assert sf["btard_delta_pt"] == pytest.approx(-2.0)
    b = sf["bans"]["btard"]
    assert (b["banned"], b["first_ban_step"], b["last_ban_step"], b["first_ban_after_attack"]) == (2, 7, 9, 2)
    a = rows["alie"]["bans"]["btard"]
    assert (a["banned"], a["honest_banned"], a["not_banned"]) == (1, 1, ["cc"])
    assert "| sign-flip | 0.8800 | 0.1000 | -2.00 pt | 2/2 | 7 (+2) | 9 (+4) | 0 |" in proc.stdout


def test_robustness_worst_case_over_seeds_and_starts(tmp_path):
    """Two --from directories (attack starts 5 and 8) × seeds 0, 1: the distribution per attack and defense —
    mean and worst accuracy, worst Δ against the same seed's and start's no-attack run, fewest attackers banned,
    most honest banned — and the goal (worst Δ within 1.5 pt, every attacker banned, no honest ban)."""

    def summary(attack, defense, seed, acc, banned=None, honest=(), halted=None):
        return {
            "attack": attack,
            "defense": defense,
            "seed": seed,
            "byzantine": 2 if attack != "none" else 0,
            "final_accuracy": acc,
            "byzantine_banned": banned or {},
            "byzantine_not_banned": [],
            "honest_banned": list(honest),
            "halted": halted,
        }

    grids = {
        5: [
            summary("none", "btard", 0, 0.90),
            summary("none", "btard", 1, 0.92),
            summary("none", "mean", 0, 0.91),
            summary("none", "mean", 1, 0.93),
            summary("alie", "btard", 0, 0.89, {"aa": 7, "bb": 9}),
            summary("alie", "btard", 1, 0.91, {"aa": 6, "bb": 6}),
            summary("alie", "mean", 0, 0.50),
            summary("alie", "mean", 1, 0.60),
        ],
        8: [
            summary("none", "btard", 0, 0.95),  # a better baseline: the same accuracy is a larger drop
            summary("none", "btard", 1, 0.92),
            summary("none", "mean", 0, 0.91),
            summary("none", "mean", 1, 0.93),
            summary("alie", "btard", 0, 0.91, {"aa": 20}, [{"step": 9, "peer": "dd", "byzantine": False}]),
            summary("alie", "btard", 1, 0.92, {"aa": 9, "bb": 10}),
            summary("alie", "mean", 0, 0.40),
            summary("alie", "mean", 1, 0.70),
        ],
    }
    dirs = []
    for start, runs in grids.items():
        d = tmp_path / f"start{start}"
        d.mkdir()
        cfg = {"task": "t", "peers": 7, "byzantine": 2, "steps": 30, "attack_start": start}
        (d / "results.json").write_text(
            json.dumps({"config": cfg | {"defenses": ["btard", "mean"]}, "runs": runs})
        )
        dirs += ["--from", str(d)]
    out = tmp_path / "robustness.json"
    proc = run("robustness.py", *dirs, "--out", str(out), timeout=60)
    r = json.loads(out.read_text())
    assert r["attack_starts"] == [5, 8] and r["seeds"] == [0, 1] and len(r["rows"]) == 8
    s = {(e["attack"], e["defense"]): e for e in r["summary"]}
    bt = s[("alie", "btard")]
    assert bt["runs"] == 4
    assert bt["mean_accuracy"] == pytest.approx((0.89 + 0.91 + 0.91 + 0.92) / 4)
    assert bt["worst_accuracy"] == pytest.approx(0.89) and bt["worst_accuracy_at"] == {
        "seed": 0,
        "attack_start": 5,
    }
    # worst Δ: 0.91 against start 8's own baseline 0.95, not the lowest accuracy
    assert bt["worst_delta_pt"] == pytest.approx(-4.0) and bt["worst_delta_at"] == {
        "seed": 0,
        "attack_start": 8,
    }
    assert bt["mean_delta_pt"] == pytest.approx((-1 - 1 - 4 + 0) / 4)
    assert (bt["attackers_banned_min"], bt["byzantine"], bt["honest_banned_max"]) == (1, 2, 1)
    assert bt["not_all_banned_at"] == [{"seed": 0, "attack_start": 8, "banned": 1, "byzantine": 2}]
    assert bt["last_ban_after_attack_max"] == 12  # step 20, attack from 8
    assert not bt["goal_met"]
    assert set(bt["goal_failures"]) == {"worst Δ below −1.5 pt", "attacker not banned", "honest peer banned"}
    mean = s[("alie", "mean")]
    assert mean["worst_accuracy"] == pytest.approx(0.40) and mean["worst_delta_pt"] == pytest.approx(-51.0)
    assert "goal_met" not in mean and "attackers_banned_min" not in mean
    assert s[("none", "btard")]["goal_met"] and s[("none", "btard")]["honest_banned_max"] == 0
    assert (
        "| alie | btard | 4 | 0.9075 | 0.8900 (s0, t5) | -1.50 pt | -4.00 pt (s0, t8) | 1/2 | +12 | 1 |"
        in (proc.stdout)
    )
    assert (
        "| alie (seed 1, start 8) | 0.9200 | 0.7000 | +0.00 pt | 2/2 | 9 (+1) | 10 (+2) | 0 |" in proc.stdout
    )


def test_agreement_search_tiny(tmp_path):
    out = tmp_path / "agreement.json"
    proc = run(
        "agreement_search.py",
        "--schedules",
        "16",
        "--seed-start",
        "500",
        "--workers",
        "1",
        "--out",
        str(out),
        timeout=240,
    )
    rows = json.loads(out.read_text())["rows"]
    assert {r["strategy"] for r in rows} >= {"withhold", "equivocate", "late-part", "mixed"}
    assert sum(r["schedules"] for r in rows) == 16
    for r in rows:
        assert r["split"] == r["honest-ban"] == r["crash"] == r["stuck"] == 0, r
    assert "| strategy |" in proc.stdout
