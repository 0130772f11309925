"""A grid of simulated runs (attacks × defenses × seeds) with a comparison table and the paper-style figure.

Config (TOML or JSON)::

    task = "mnist"
    peers = 16
    byzantine = 7
    steps = 600
    attack_start = 100
    eval_every = 50
    seeds = [0]
    defenses = ["btard", "mean"]
    jobs = 2                      # runs in parallel (one torch thread each)
    [[attacks]]                   # "none" is always added as the baseline row
    name = "sign-flip"
    [[attacks]]
    name = "ipm"
    params = { eps = 0.1 }
"""

from __future__ import annotations

import json
import os
import tomllib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from btard.sim.plots import plot_grid


@dataclass
class ExperimentConfig:
    task: str = "mnist"
    peers: int = 16
    byzantine: int = 7
    steps: int = 600
    attack_start: int = 100
    eval_every: int = 50
    eval_examples: int | None = 2000
    seeds: list[int] = field(default_factory=lambda: [0])
    defenses: list[str] = field(default_factory=lambda: ["btard", "mean"])
    attacks: list[dict] = field(default_factory=list)
    tau: float | str = "adaptive"
    validators: int = 1
    jobs: int = 2
    task_overrides: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> ExperimentConfig:
        text = Path(path).read_text()
        data = tomllib.loads(text) if str(path).endswith(".toml") else json.loads(text)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown experiment settings: {sorted(unknown)}")
        return cls(**data)

    def runs(self) -> list[dict]:
        attacks = [{"name": "none"}] + [a for a in self.attacks if a.get("name") != "none"]
        out = []
        for seed in self.seeds:
            for a in attacks:
                for d in self.defenses:
                    out.append(
                        {"attack": a["name"], "params": a.get("params", {}), "defense": d, "seed": seed}
                    )
        return out


def _run_one(args: tuple[ExperimentConfig, dict, str]) -> dict:
    cfg, run, out_dir = args
    import torch

    torch.set_num_threads(1)
    from btard.sim.runner import SimConfig, Simulator

    attack = None if run["attack"] == "none" else run["attack"]
    sim_cfg = SimConfig(
        task=cfg.task,
        task_overrides=cfg.task_overrides,
        peers=cfg.peers,
        byzantine=cfg.byzantine if attack else 0,
        attack=attack,
        attack_params=run["params"],
        attack_start=cfg.attack_start,
        aggregator=run["defense"],
        tau=cfg.tau,
        validators=cfg.validators,
        steps=cfg.steps,
        seed=run["seed"],
        eval_every=cfg.eval_every,
        eval_examples=cfg.eval_examples,
        out_dir=out_dir,
        progress=False,
    )
    sim = Simulator(sim_cfg)
    metrics = sim.run()
    summary = sim.summary()
    summary["curve"] = [(m.step + 1, m.test_accuracy) for m in metrics if m.test_accuracy is not None]
    summary["seed"] = run["seed"]
    summary["attack"] = run["attack"]
    summary["defense"] = run["defense"]
    return summary


def run_experiment(cfg: ExperimentConfig, out: str | Path, *, log=print) -> dict:
    """Run the grid; write results.json, results.md and figure.png under `out`. Returns the results."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = cfg.runs()
    jobs = max(1, min(cfg.jobs, len(runs), os.cpu_count() or 1))
    args = [(cfg, r, str(out / f"{r['attack']}-{r['defense']}-seed{r['seed']}")) for r in runs]
    results: list[dict] = []
    log(f"experiment: {len(runs)} runs, {jobs} in parallel, results in {out}")
    if jobs == 1:
        it = map(_run_one, args)
    else:
        import multiprocessing as mp

        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"))
        it = pool.map(_run_one, args)
    try:
        for res in it:
            results.append(res)
            log(
                f"  {res['attack']:>18} / {res['defense']:<12} seed {res['seed']}: "
                f"accuracy {res['final_accuracy']:.4f}, attackers banned {len(res['byzantine_banned'])}"
                f"/{res['byzantine']}, honest banned {len(res['honest_banned'])}, "
                f"{res['mean_step_seconds']:.3f} s/step"
            )
    finally:
        if jobs > 1:
            pool.shutdown()
    table = comparison_table(results, cfg)
    (out / "results.json").write_text(json.dumps({"config": cfg.__dict__, "runs": results}, indent=2))
    (out / "results.md").write_text(table)
    curves: dict[str, dict[str, list]] = {}
    for r in results:
        if r["seed"] == cfg.seeds[0]:
            curves.setdefault(r["attack"], {})[r["defense"]] = r["curve"]
    plot_grid(curves, cfg.attack_start, out / "figure.png")
    log(table)
    return {"runs": results, "table": table}


def comparison_table(results: list[dict], cfg: ExperimentConfig) -> str:
    """Markdown: final accuracy per (attack, defense), BTARD's drop against its no-attack run, ban steps."""
    defenses = cfg.defenses
    by = {(r["attack"], r["defense"], r["seed"]): r for r in results}
    attacks = list(dict.fromkeys(r["attack"] for r in results))
    head = "| attack | " + " | ".join(f"{d} accuracy" for d in defenses)
    head += " | btard Δ vs no attack | attackers banned (steps) | honest banned |"
    lines = [head, "|" + "---|" * (len(defenses) + 4)]
    for a in attacks:
        for s in cfg.seeds:
            accs = []
            for d in defenses:
                r = by.get((a, d, s))
                accs.append(f"{r['final_accuracy']:.4f}" if r else "—")
            bt, base = by.get((a, "btard", s)), by.get(("none", "btard", s))
            delta = (
                f"{100 * (bt['final_accuracy'] - base['final_accuracy']):+.2f} pt"
                if bt and base and a != "none"
                else "—"
            )
            if bt and a != "none":
                steps = sorted(bt["byzantine_banned"].values())
                bans = f"{len(steps)}/{bt['byzantine']} ({', '.join(map(str, steps))})"
                honest = str(len(bt["honest_banned"]))
            else:
                bans, honest = "—", "0" if bt else "—"
            label = a if len(cfg.seeds) == 1 else f"{a} (seed {s})"
            lines.append(f"| {label} | " + " | ".join(accs) + f" | {delta} | {bans} | {honest} |")
    return "\n".join(lines) + "\n"
