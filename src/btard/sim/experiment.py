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
    validators = 1                # m per step; refused unless 2·byzantine < peers − m (see runner)
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

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError (one line) unless every run of the grid is a configuration `SimConfig` accepts (in
        particular an honest majority among each step's aggregated contributors)."""

        if not self.seeds or not self.defenses:
            raise ValueError("need at least one seed and one defense")
        if isinstance(self.jobs, bool) or not isinstance(self.jobs, int) or self.jobs < 1:
            raise ValueError(f"jobs must be an integer ≥ 1, got {self.jobs!r}")
        for a in self.attacks:
            if not isinstance(a, dict) or "name" not in a:
                raise ValueError(f"each [[attacks]] entry needs a name, got {a!r}")
        from btard.sim.runner import honest_majority_error

        for defense in self.defenses:
            why = honest_majority_error(
                self.peers, self.byzantine, self.validators if defense == "btard" else 0
            )
            if why:
                raise ValueError(f"refused: {why}")
        for run in self.runs():
            self._sim_config(run, out_dir=None)

    def _sim_config(self, run: dict, out_dir: str | None):
        from btard.sim.runner import SimConfig

        attack = None if run["attack"] == "none" else run["attack"]
        return SimConfig(
            task=self.task,
            task_overrides=self.task_overrides,
            peers=self.peers,
            byzantine=self.byzantine if attack else 0,
            attack=attack,
            attack_params=run["params"],
            attack_start=self.attack_start,
            aggregator=run["defense"],
            tau=self.tau,
            validators=self.validators,
            steps=self.steps,
            seed=run["seed"],
            eval_every=self.eval_every,
            eval_examples=self.eval_examples,
            out_dir=out_dir,
            progress=False,
        )

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
    from btard.sim.runner import SimulationHalted, Simulator

    sim = Simulator(cfg._sim_config(run, out_dir))
    halted = None
    try:
        metrics = sim.run()
    except SimulationHalted as e:  # recorded as a halted run; the rest of the grid goes on
        halted, metrics = str(e), sim.metrics
    summary = sim.summary()
    summary["halted"] = halted
    summary["curve"] = [(m.step + 1, m.test_accuracy) for m in metrics if m.test_accuracy is not None]
    summary["seed"] = run["seed"]
    summary["attack"] = run["attack"]
    summary["defense"] = run["defense"]
    return summary


def run_experiment(cfg: ExperimentConfig, out: str | Path, *, log=print) -> dict:
    """Run the grid; write results.json, results.md and figure.png under `out`. Returns the results."""
    cfg.validate()
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
                f"accuracy {_accuracy(res)}, attackers banned {len(res['byzantine_banned'])}"
                f"/{res['byzantine']}, honest banned {len(res['honest_banned'])}, "
                f"{res['mean_step_seconds']:.3f} s/step"
                + (f" (halted: {res['halted']})" if res.get("halted") else "")
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


def _accuracy(run: dict) -> str:
    """The final accuracy of a run for the log and the table, or "halted" for a run that could not finish."""
    if run.get("halted") or run.get("final_accuracy") is None:
        return "halted"
    return f"{run['final_accuracy']:.4f}"


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
                accs.append(_accuracy(r) if r else "—")
            bt, base = by.get((a, "btard", s)), by.get(("none", "btard", s))
            delta = (
                f"{100 * (bt['final_accuracy'] - base['final_accuracy']):+.2f} pt"
                if bt and base and a != "none" and not bt.get("halted") and not base.get("halted")
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
