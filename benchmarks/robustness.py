"""Robustness table: final accuracy under each attack per defense, and how fast BTARD bans the attackers.

Reads the output of `btard experiment CONFIG --out DIR` (DIR/results.json; or, for a grid still running or
interrupted, every DIR/*/summary.json with its config.json) and prints, per attack (and seed):

* final test accuracy of every defense in the grid (btard, mean, ...), and btard's change against its own
  no-attack run;
* for each defense that bans (btard): attackers banned / Byzantine peers, the first and last ban step of a
  Byzantine peer (absolute, and in steps after the attack start), the attackers never banned, and the number of
  honest peers banned.

With several runs per attack and defense (several seeds, and/or several experiment directories through repeated
--from, e.g. the same grid with two attack start times), it also reports the distribution (issue 11: robustness is
a distribution, not one seed), per attack and defense: mean and WORST final accuracy, mean and worst change (in
points) against the no-attack run of the same seed and directory (so the same attack start), attackers banned (the
minimum over runs), the latest ban after the attack start (the maximum), honest peers banned (the maximum over
runs), halted runs, and for the banning defense whether the goal holds: worst Δ within --goal-pt (1.5) points of
no attack, every attacker banned in every run, no honest ban, no halted run.

Modes:
  --from DIR        read an existing experiment directory (e.g. runs/mnist-grid); repeat to combine several
  --config FILE     run that experiment config first (into --run-dir, default a temporary directory)
  --quick           run a tiny grid (digits, 9 peers of which 3 Byzantine, 40 steps, attack from step 10;
                    none / sign-flip / random-direction; btard and mean), ~30 s on 2 cores

Writes markdown (stdout, and --md if given) and JSON (--out).

Usage: python benchmarks/robustness.py --from runs/mnist-grid [--out bench-results/robustness.json]
       python benchmarks/robustness.py --from runs/digits-seeds-start10 --from runs/digits-seeds-start40 \
           --md docs/robustness-seeds.md --out docs/robustness-seeds.json
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


BANNING_DEFENSES = ("btard",)  # defenses that ban peers: only they have ban statistics and the ban goals
GOAL_PT = 1.5  # issue 11: the worst case within this many points of no attack


def combine(sources: list[tuple[str, dict, list[dict]]]) -> tuple[dict, list[dict]]:
    """One (config, runs) from several experiment directories [(name, config, runs)]: every run is tagged with
    the index of its directory (`source`) and that grid's attack start; the config is the first directory's, with
    `sources` listing each directory and its config."""
    runs = []
    for i, (_, cfg, rs) in enumerate(sources):
        for r in rs:
            runs.append({**r, "source": i, "attack_start": int(cfg.get("attack_start", 0))})
    config = dict(sources[0][1]) if sources else {}
    if len(sources) > 1:
        config["sources"] = [{"dir": name, "config": cfg} for name, cfg, _ in sources]
    return config, runs


def _delta_pt(run: dict | None, base: dict | None) -> float | None:
    if not run or not base or None in (run.get("final_accuracy"), base.get("final_accuracy")):
        return None
    return 100 * (run["final_accuracy"] - base["final_accuracy"])


def build_table(config: dict, runs: list[dict], goal_pt: float = GOAL_PT) -> dict:
    """Per-run rows (attack × directory × seed) and, per attack and defense, the distribution over those runs.

    A run without `source` belongs to directory 0; without `attack_start`, it started at the config's."""
    attack_start = int(config.get("attack_start", 0))
    attacks = list(dict.fromkeys(r["attack"] for r in runs))
    if "none" in attacks:
        attacks = ["none"] + [a for a in attacks if a != "none"]
    defenses = list(dict.fromkeys(config.get("defenses") or [r["defense"] for r in runs]))
    defenses += [d for d in dict.fromkeys(r["defense"] for r in runs) if d not in defenses]
    seeds = sorted({r.get("seed", 0) for r in runs})
    sources = sorted({r.get("source", 0) for r in runs})
    start_of = {r.get("source", 0): int(r.get("attack_start", attack_start)) for r in runs}
    starts = sorted(set(start_of.values())) or [attack_start]
    by = {(r.get("source", 0), r["attack"], r["defense"], r.get("seed", 0)): r for r in runs}
    rows = []
    for a in attacks:
        for src in sources:
            for s in seeds:
                if not any((src, a, d, s) in by for d in defenses):
                    continue
                got = {d: by.get((src, a, d, s)) for d in defenses}
                acc = {d: got[d].get("final_accuracy") if got[d] else None for d in defenses}
                row: dict = {"attack": a, "seed": s, "accuracy": acc}
                if len(sources) > 1:
                    row["source"] = src
                row["attack_start"] = start_of[src]
                # each defense against its own no-attack run of the same seed and directory (same attack start)
                row["delta_pt"] = {
                    d: None if a == "none" else _delta_pt(got[d], by.get((src, "none", d, s)))
                    for d in defenses
                }
                row["btard_delta_pt"] = row["delta_pt"].get("btard")
                row["halted"] = {d: got[d].get("halted") for d in defenses if got[d] and got[d].get("halted")}
                # only defenses that ban (btard) have ban statistics; a no-attack run has no Byzantine peers
                row["bans"] = {
                    d: ban_stats(got[d], start_of[src]) for d in defenses if got[d] and d in BANNING_DEFENSES
                }
                rows.append(row)
    mean_acc: dict[str, dict[str, float | None]] = {}
    for a in attacks:
        for d in defenses:
            xs = [r["accuracy"][d] for r in rows if r["attack"] == a and r["accuracy"][d] is not None]
            mean_acc.setdefault(a, {})[d] = statistics.fmean(xs) if xs else None
    return {
        "config": config,
        "attack_start": attack_start if len(starts) == 1 else starts,
        "attack_starts": starts,
        "defenses": defenses,
        "attacks": attacks,
        "seeds": seeds,
        "rows": rows,
        "mean_accuracy_over_seeds": mean_acc,
        "goal_pt": goal_pt,
        "summary": summarize(rows, attacks, defenses, goal_pt),
    }


def summarize(
    rows: list[dict], attacks: list[str], defenses: list[str], goal_pt: float = GOAL_PT
) -> list[dict]:
    """Per attack and defense, over all its runs (seeds × directories): mean and worst accuracy, mean and worst Δ
    against the same seed's no-attack run, min attackers banned, max honest banned, halted runs; and, for a
    banning defense under an attack, whether the goal holds (reasons where not)."""
    out = []
    for a in attacks:
        for d in defenses:
            mine = [
                r for r in rows if r["attack"] == a and (r["accuracy"][d] is not None or d in r["halted"])
            ]
            if not mine:
                continue
            where = lambda r: {"seed": r["seed"], "attack_start": r["attack_start"]}  # noqa: E731
            accs = [r for r in mine if r["accuracy"][d] is not None]
            deltas = [r for r in mine if r["delta_pt"].get(d) is not None]
            worst_acc = min(accs, key=lambda r: r["accuracy"][d]) if accs else None
            worst_delta = min(deltas, key=lambda r: r["delta_pt"][d]) if deltas else None
            halted = [where(r) | {"why": r["halted"][d]} for r in mine if d in r["halted"]]
            entry: dict = {
                "attack": a,
                "defense": d,
                "runs": len(mine),
                "mean_accuracy": statistics.fmean(r["accuracy"][d] for r in accs) if accs else None,
                "worst_accuracy": worst_acc["accuracy"][d] if worst_acc else None,
                "worst_accuracy_at": where(worst_acc) if worst_acc else None,
                "mean_delta_pt": statistics.fmean(r["delta_pt"][d] for r in deltas) if deltas else None,
                "worst_delta_pt": worst_delta["delta_pt"][d] if worst_delta else None,
                "worst_delta_at": where(worst_delta) if worst_delta else None,
                "halted": halted,
            }
            bans = [(r, r["bans"][d]) for r in mine if d in r["bans"]]
            if bans:
                honest = max(bans, key=lambda rb: rb[1]["honest_banned"])
                entry["honest_banned_max"] = honest[1]["honest_banned"]
                entry["honest_banned_at"] = [where(r) for r, b in bans if b["honest_banned"]]
                if a != "none":
                    fewest = min(bans, key=lambda rb: rb[1]["banned"] - rb[1]["byzantine"])
                    entry["byzantine"] = fewest[1]["byzantine"]
                    entry["attackers_banned_min"] = fewest[1]["banned"]
                    entry["not_all_banned_at"] = [
                        where(r) | {"banned": b["banned"], "byzantine": b["byzantine"]}
                        for r, b in bans
                        if b["banned"] < b["byzantine"]
                    ]
                    lasts = [
                        b["last_ban_after_attack"] for _, b in bans if b["last_ban_after_attack"] is not None
                    ]
                    entry["last_ban_after_attack_max"] = max(lasts) if lasts else None
            if d in BANNING_DEFENSES:
                fails = []
                if a != "none":
                    if entry["worst_delta_pt"] is None or entry["worst_delta_pt"] < -goal_pt:
                        fails.append(f"worst Δ below −{goal_pt:g} pt")
                    if entry.get("not_all_banned_at"):
                        fails.append("attacker not banned")
                if entry.get("honest_banned_max"):
                    fails.append("honest peer banned")
                if halted:
                    fails.append("halted")
                entry["goal_met"] = not fails
                entry["goal_failures"] = fails
            out.append(entry)
    return out


def _fmt(x: float | int | None, spec: str = "") -> str:
    return "—" if x is None else format(x, spec)


def _at(w: dict | None) -> str:
    return "" if not w else f" (s{w['seed']}, t{w['attack_start']})"


def markdown(table: dict) -> str:
    defenses = table["defenses"]
    multi_start = any("source" in r for r in table["rows"])
    multi = len(table["seeds"]) > 1 or multi_start
    # two directories with the same attack start: name the directory too (its index in `config["sources"]`)
    ambiguous = multi_start and len(table["attack_starts"]) < len({r["source"] for r in table["rows"]})
    head = (
        "| attack | "
        + " | ".join(f"{d} accuracy" for d in defenses)
        + " | btard Δ vs no attack | attackers banned | first ban (step, +after attack) "
        "| last ban (step, +after attack) | honest banned |"
    )
    lines = [head, "|" + "---|" * (len(defenses) + 6)]
    for r in table["rows"]:
        if multi_start:
            label = f"{r['attack']} (seed {r['seed']}, start {r['attack_start']}"
            label += f", dir {r['source']})" if ambiguous else ")"
        else:
            label = f"{r['attack']} (seed {r['seed']})" if multi else r["attack"]
        accs = " | ".join(
            "halted"
            if d in r.get("halted", {}) and r["accuracy"][d] is None
            else _fmt(r["accuracy"][d], ".4f")
            for d in defenses
        )
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
    starts = table["attack_starts"]
    start_txt = (
        f"attack from step {starts[0]}"
        if len(starts) == 1
        else "attack from step " + " or ".join(map(str, starts))
    )
    note = (
        f"\n{c.get('task', '?')}, {c.get('peers', '?')} peers of which {c.get('byzantine', '?')} Byzantine, "
        f"{start_txt} of {c.get('steps', '?')}; final test accuracy; ban steps are "
        "BTARD's bans of Byzantine peers.\n"
    )
    per_run = "\n".join(lines) + "\n" + note
    if not multi:
        return per_run
    return summary_markdown(table) + "\n### Every run\n\n" + per_run


def summary_markdown(table: dict) -> str:
    """The distribution table: one row per attack and defense over all seeds and attack starts."""
    goal = table.get("goal_pt", GOAL_PT)
    lines = [
        "| attack | defense | runs | mean accuracy | worst accuracy (seed, start) | mean Δ vs no attack "
        "| worst Δ vs no attack (seed, start) | attackers banned (min) | last ban after attack (max) "
        "| honest banned (max) | goal |",
        "|" + "---|" * 11,
    ]
    for e in table["summary"]:
        mean_d = "—" if e["mean_delta_pt"] is None else f"{e['mean_delta_pt']:+.2f} pt"
        worst_d = (
            "—" if e["worst_delta_pt"] is None else f"{e['worst_delta_pt']:+.2f} pt{_at(e['worst_delta_at'])}"
        )
        banned = f"{e['attackers_banned_min']}/{e['byzantine']}" if "attackers_banned_min" in e else "—"
        last = "—" if e.get("last_ban_after_attack_max") is None else f"+{e['last_ban_after_attack_max']}"
        honest = "—" if "honest_banned_max" not in e else str(e["honest_banned_max"])
        if "goal_met" not in e:
            g = "—"
        else:
            g = "yes" if e["goal_met"] else "**no**: " + ", ".join(e["goal_failures"])
        runs = str(e["runs"]) + (f" ({len(e['halted'])} halted)" if e["halted"] else "")
        lines.append(
            f"| {e['attack']} | {e['defense']} | {runs} | {_fmt(e['mean_accuracy'], '.4f')} "
            f"| {_fmt(e['worst_accuracy'], '.4f')}{_at(e['worst_accuracy_at'])} | {mean_d} | {worst_d} "
            f"| {banned} | {last} | {honest} | {g} |"
        )
    seeds = ", ".join(map(str, table["seeds"]))
    starts = ", ".join(map(str, table["attack_starts"]))
    note = (
        f"\nOver seeds {seeds} × attack starts {starts}. Δ: final accuracy minus that of the same defense's "
        "no-attack run of the same seed and attack start, in points; worst = lowest. Attackers banned: the fewest "
        "over the runs; last ban: the latest ban of a Byzantine peer, in steps after the attack start; honest "
        f"banned: the most over the runs. Goal (issue 11, banning defense): worst Δ ≥ −{goal:g} pt, every "
        "attacker banned in every run, no honest ban, no halted run.\n"
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
    src.add_argument(
        "--from",
        dest="from_dir",
        action="append",
        help="an existing `btard experiment` output directory; repeat to combine several (e.g. attack starts)",
    )
    src.add_argument("--config", help="run this experiment config (TOML or JSON) first")
    src.add_argument("--quick", action="store_true", help="run a tiny built-in grid (for CI)")
    ap.add_argument(
        "--run-dir", help="where --config/--quick write the runs (default: a temporary directory)"
    )
    ap.add_argument("--jobs", type=int, default=None, help="override the config's parallel runs")
    ap.add_argument("--out", default="bench-results/robustness.json")
    ap.add_argument("--md", default=None, help="also write the markdown table here")
    ap.add_argument(
        "--goal-pt",
        type=float,
        default=GOAL_PT,
        help="goal: the worst case within this many points of no attack (default %(default)s)",
    )
    args = ap.parse_args()

    meta: dict = {"benchmark": "robustness", "quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="btard-robustness-") as tmp:
        if args.from_dir:
            run_dirs = [Path(d) for d in args.from_dir]
            meta["source"] = str(run_dirs[0]) if len(run_dirs) == 1 else [str(d) for d in run_dirs]
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
            run_dirs = [run_dir]
        if len(run_dirs) == 1:
            config, runs = load_runs(run_dirs[0])
        else:
            config, runs = combine([(str(d), *load_runs(d)) for d in run_dirs])
    table = build_table(config, runs, goal_pt=args.goal_pt)
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
