"""Robustness table: final accuracy under each attack per defense, and how fast BTARD bans the attackers.

Reads the output of `btard experiment CONFIG --out DIR` (DIR/results.json; or, for a grid still running or
interrupted, every DIR/*/summary.json with its config.json) and prints, per attack (and seed):

* final test accuracy of every defense in the grid (btard, mean, ...), and btard's change against its own
  no-attack run;
* for each defense that bans (btard): attackers banned / Byzantine peers, the first and last ban step of a
  Byzantine peer (absolute, and in steps after the attack start), the attackers never banned, and the number of
  honest peers banned.

Modes:
  --from DIR        read an existing experiment directory (e.g. runs/mnist-grid)
  --config FILE     run that experiment config first (into --run-dir, default a temporary directory)
  --quick           run a tiny grid (digits, 9 peers of which 3 Byzantine, 40 steps, attack from step 10;
                    none / sign-flip / random-direction; btard and mean), ~30 s on 2 cores

Writes markdown (stdout, and --md if given) and JSON (--out).

Usage: python benchmarks/robustness.py --from runs/mnist-grid [--out bench-results/robustness.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

QUICK_TOML = """\
# benchmarks/robustness.py --quick: a tiny grid that finishes in well under 90 s on 2 cores
task = "digits"
peers = 9
byzantine = 3
steps = 40
attack_start = 10
eval_every = 20
eval_examples = 360
seeds = [0]
defenses = ["btard", "mean"]
validators = 2
jobs = 2

[[attacks]]
name = "sign-flip"
[[attacks]]
name = "random-direction"
"""


# ----------------------------------------------------------------------------------------------- reading
def load_runs(path: Path) -> tuple[dict, list[dict]]:
    """(experiment config, one summary per run) from an experiment directory."""
    results = path / "results.json"
    if results.exists():
        data = json.loads(results.read_text())
        return data.get("config", {}), data["runs"]
    runs, config = [], {}
    for summary in sorted(path.glob("*/summary.json")):
        s = json.loads(summary.read_text())
        cfg_file = summary.parent / "config.json"
        rc = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        s.setdefault("attack", rc.get("attack"))
        s["attack"] = s["attack"] or "none"
        s.setdefault("defense", s.get("aggregator", rc.get("aggregator")))
        s.setdefault("seed", rc.get("seed", 0))
        if not config and rc:
            config = {k: rc[k] for k in ("task", "peers", "byzantine", "steps", "attack_start") if k in rc}
        runs.append(s)
    if not runs:
        raise SystemExit(
            f"{path}: no results.json and no */summary.json (is it a `btard experiment` output?)"
        )
    return config, runs


def ban_stats(run: dict, attack_start: int) -> dict:
    """Steps to ban of the Byzantine peers of one run (None where nobody was banned)."""
    steps = sorted(run.get("byzantine_banned", {}).values())
    honest = run.get("honest_banned", [])
    first, last = (steps[0], steps[-1]) if steps else (None, None)
    return {
        "byzantine": run.get("byzantine", 0),
        "banned": len(steps),
        "ban_steps": steps,
        "first_ban_step": first,
        "last_ban_step": last,
        "first_ban_after_attack": None if first is None else first - attack_start,
        "last_ban_after_attack": None if last is None else last - attack_start,
        "not_banned": run.get("byzantine_not_banned", []),
        "honest_banned": len(honest),
        "honest_banned_detail": honest,
    }


def build_table(config: dict, runs: list[dict]) -> dict:
    attack_start = int(config.get("attack_start", 0))
    attacks = list(dict.fromkeys(r["attack"] for r in runs))
    if "none" in attacks:
        attacks = ["none"] + [a for a in attacks if a != "none"]
    defenses = list(dict.fromkeys(config.get("defenses") or [r["defense"] for r in runs]))
    defenses += [d for d in dict.fromkeys(r["defense"] for r in runs) if d not in defenses]
    seeds = sorted({r.get("seed", 0) for r in runs})
    by = {(r["attack"], r["defense"], r.get("seed", 0)): r for r in runs}
    rows = []
    for a in attacks:
        for s in seeds:
            if not any((a, d, s) in by for d in defenses):
                continue
            acc = {d: by[(a, d, s)].get("final_accuracy") if (a, d, s) in by else None for d in defenses}
            row: dict = {"attack": a, "seed": s, "accuracy": acc}
            base = by.get(("none", "btard", s))
            bt = by.get((a, "btard", s))
            row["btard_delta_pt"] = (
                100 * (bt["final_accuracy"] - base["final_accuracy"])
                if a != "none" and bt and base and None not in (bt["final_accuracy"], base["final_accuracy"])
                else None
            )
            # only defenses that ban (btard) have ban statistics; a no-attack run has no Byzantine peers
            row["bans"] = {
                d: ban_stats(by[(a, d, s)], attack_start)
                for d in defenses
                if (a, d, s) in by and d == "btard"
            }
            rows.append(row)
    mean_acc: dict[str, dict[str, float | None]] = {}
    for a in attacks:
        for d in defenses:
            xs = [r["accuracy"][d] for r in rows if r["attack"] == a and r["accuracy"][d] is not None]
            mean_acc.setdefault(a, {})[d] = statistics.fmean(xs) if xs else None
    return {
        "config": config,
        "attack_start": attack_start,
        "defenses": defenses,
        "attacks": attacks,
        "seeds": seeds,
        "rows": rows,
        "mean_accuracy_over_seeds": mean_acc,
    }


def _fmt(x: float | int | None, spec: str = "") -> str:
    return "—" if x is None else format(x, spec)


def markdown(table: dict) -> str:
    defenses, multi = table["defenses"], len(table["seeds"]) > 1
    head = (
        "| attack | "
        + " | ".join(f"{d} accuracy" for d in defenses)
        + " | btard Δ vs no attack | attackers banned | first ban (step, +after attack) "
        "| last ban (step, +after attack) | honest banned |"
    )
    lines = [head, "|" + "---|" * (len(defenses) + 6)]
    for r in table["rows"]:
        label = f"{r['attack']} (seed {r['seed']})" if multi else r["attack"]
        accs = " | ".join(_fmt(r["accuracy"][d], ".4f") for d in defenses)
        delta = "—" if r["btard_delta_pt"] is None else f"{r['btard_delta_pt']:+.2f} pt"
        b = r["bans"].get("btard")
        if b is None or r["attack"] == "none":
            banned, first, last = "—", "—", "—"
            honest = "—" if b is None else str(b["honest_banned"])
        else:
            banned = f"{b['banned']}/{b['byzantine']}"
            first = (
                "—"
                if b["first_ban_step"] is None
                else f"{b['first_ban_step']} (+{b['first_ban_after_attack']})"
            )
            last = (
                "—" if b["last_ban_step"] is None else f"{b['last_ban_step']} (+{b['last_ban_after_attack']})"
            )
            if b["banned"] < b["byzantine"]:
                last += f", {b['byzantine'] - b['banned']} never"
            honest = str(b["honest_banned"])
        lines.append(f"| {label} | {accs} | {delta} | {banned} | {first} | {last} | {honest} |")
    c = table["config"]
    note = (
        f"\n{c.get('task', '?')}, {c.get('peers', '?')} peers of which {c.get('byzantine', '?')} Byzantine, "
        f"attack from step {table['attack_start']} of {c.get('steps', '?')}; final test accuracy; ban steps are "
        "BTARD's bans of Byzantine peers.\n"
    )
    return "\n".join(lines) + "\n" + note


# ----------------------------------------------------------------------------------------------- running
def run_grid(config_path: Path, out_dir: Path, jobs: int | None) -> float:
    from btard.sim.experiment import ExperimentConfig, run_experiment

    cfg = ExperimentConfig.load(config_path)
    if jobs is not None:
        cfg.jobs = jobs
    t0 = time.perf_counter()
    run_experiment(cfg, out_dir, log=lambda *a: None)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--from", dest="from_dir", help="an existing `btard experiment` output directory")
    src.add_argument("--config", help="run this experiment config (TOML or JSON) first")
    src.add_argument("--quick", action="store_true", help="run a tiny built-in grid (for CI)")
    ap.add_argument(
        "--run-dir", help="where --config/--quick write the runs (default: a temporary directory)"
    )
    ap.add_argument("--jobs", type=int, default=None, help="override the config's parallel runs")
    ap.add_argument("--out", default="bench-results/robustness.json")
    ap.add_argument("--md", default=None, help="also write the markdown table here")
    args = ap.parse_args()

    meta: dict = {"benchmark": "robustness", "quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="btard-robustness-") as tmp:
        if args.from_dir:
            run_dir = Path(args.from_dir)
            meta["source"] = str(run_dir)
        else:
            run_dir = Path(args.run_dir) if args.run_dir else Path(tmp) / "grid"
            if args.quick:
                config_path = Path(tmp) / "quick.toml"
                config_path.write_text(QUICK_TOML)
                meta["config_toml"] = QUICK_TOML
            else:
                config_path = Path(args.config)
                meta["config_file"] = str(config_path)
            meta["grid_seconds"] = run_grid(config_path, run_dir, args.jobs)
            meta["source"] = str(run_dir) if args.run_dir else "(temporary directory)"
        config, runs = load_runs(run_dir)
    table = build_table(config, runs)
    md = markdown(table)
    print(md)
    if "grid_seconds" in meta:
        print(f"grid ran in {meta['grid_seconds']:.1f} s")
    result = {"meta": meta, **table, "markdown": md, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    if args.md:
        Path(args.md).write_text(md)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
