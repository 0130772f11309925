"""The simulator on the tiny digits task: the same code path as the paper-style experiment, few steps."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from btard.sim.experiment import ExperimentConfig, run_experiment
from btard.sim.runner import SimConfig, Simulator


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def sim(**kw) -> Simulator:
    base = dict(task="digits", peers=8, byzantine=3, steps=25, attack_start=3, eval_every=25, progress=False)
    base.update(kw)
    return Simulator(SimConfig(**base))


# (attack, params): BTARD must ban every attacker and never an honest peer.
GRADIENT_ATTACKS = [
    ("sign-flip", {}),
    ("random-direction", {}),
    ("label-flip", {}),
    ("delayed-gradient", {"delay": 2, "length": 50}),
    ("ipm", {"eps": 0.1}),
    ("alie", {}),
    ("gaussian", {"sigma": 1.0}),
    ("nan", {}),
]


@pytest.mark.parametrize("attack,params", GRADIENT_ATTACKS, ids=[a for a, _ in GRADIENT_ATTACKS])
def test_btard_bans_gradient_attackers_and_no_honest_peer(attack, params):
    s = sim(attack=attack, attack_params=params, peers=9, validators=2, steps=40)
    s.run()
    summary = s.summary()
    assert summary["honest_banned"] == []
    assert summary["byzantine_not_banned"] == [], summary
    assert all(b["step"] >= 3 for b in s.ban_log)


def test_no_defense_breaks_under_sign_flip_while_btard_trains():
    mean = sim(attack="sign-flip", aggregator="mean")
    mean.run()
    btard = sim(attack="sign-flip", peers=9, validators=2)
    btard.run()
    acc_mean = mean.summary()["final_accuracy"]
    acc_btard = btard.summary()["final_accuracy"]
    assert acc_mean < 0.2 < 0.5 < acc_btard, (acc_mean, acc_btard)


@pytest.mark.parametrize("aggregator", ["median", "trimmed-mean", "krum", "geomedian", "cclip-server"])
def test_baselines_run(aggregator):
    s = sim(attack="ipm", aggregator=aggregator, steps=10)
    s.run()
    assert s.summary()["final_accuracy"] is not None


def test_protocol_attack_in_simulation():
    s = sim(attack="wrong-aggregate", steps=6)
    s.run()
    summary = s.summary()
    assert summary["honest_banned"] == [] and summary["byzantine_not_banned"] == []


def test_user_attack_from_a_file(tmp_path):
    (tmp_path / "my_attack.py").write_text(
        "from btard.attacks import GradientAttack\n"
        "class Scale(GradientAttack):\n"
        "    name = 'scale'\n"
        "    def __call__(self, ctx):\n"
        "        return ctx.own_gradient * 50\n"
    )
    s = sim(attack=f"{tmp_path / 'my_attack.py'}:Scale", peers=9, validators=2, steps=30)
    s.run()
    assert s.summary()["byzantine_not_banned"] == [] and s.summary()["honest_banned"] == []


def test_run_directory_outputs(tmp_path):
    s = sim(attack="sign-flip", steps=8, eval_every=4, out_dir=str(tmp_path / "run"))
    s.run()
    run = tmp_path / "run"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(8))
    assert lines[3]["test_accuracy"] is not None and "loss" in lines[0] and "wall_time" in lines[0]
    assert (run / "accuracy.png").stat().st_size > 1000
    out = subprocess.run(
        [sys.executable, "-m", "btard.cli", "audit", str(run / "audit.jsonl")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout


def test_small_experiment_grid(tmp_path):
    cfg = ExperimentConfig(
        task="digits",
        peers=6,
        byzantine=2,
        steps=6,
        attack_start=2,
        eval_every=3,
        attacks=[{"name": "sign-flip"}, {"name": "ipm", "params": {"eps": 0.1}}],
        jobs=1,
    )
    res = run_experiment(cfg, tmp_path, log=lambda *_: None)
    assert len(res["runs"]) == 6
    table = (tmp_path / "results.md").read_text()
    assert "sign-flip" in table and "ipm" in table and "none" in table
    assert (tmp_path / "figure.png").stat().st_size > 1000
    assert json.loads((tmp_path / "results.json").read_text())["runs"]


def test_simulate_cli(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "btard.cli",
            "simulate",
            "--task",
            "digits",
            "--peers",
            "5",
            "--byzantine",
            "1",
            "--attack",
            "sign-flip",
            "--steps",
            "5",
            "--eval-every",
            "5",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "final test accuracy" in out.stdout


def test_other_tasks_run_through_the_protocol():
    """tiny-lm (vmap path) and the CIFAR ResNet-18 (batch-norm, loop path) under the full protocol."""
    from btard.training.cifar_data import SyntheticCifarConfig

    lm = Simulator(
        SimConfig(
            task="tiny-lm",
            peers=4,
            byzantine=1,
            attack="sign-flip",
            steps=2,
            eval_every=2,
            eval_examples=64,
            progress=False,
        )
    )
    lm.run()
    assert lm.summary()["final_accuracy"] is not None
    small = SyntheticCifarConfig(train_size=256, test_size=64)
    cifar = Simulator(
        SimConfig(
            task="cifar10-resnet18",
            task_overrides={"synthetic": small, "batch_size": 2},
            peers=3,
            steps=1,
            eval_every=1,
            progress=False,
        )
    )
    cifar.run()
    assert "not CIFAR-10" in cifar.task.data_source or "generated" in cifar.task.data_source.lower()


# --- refused configurations, input validation and halts (issue 11) -----------------------------------------


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """`btard ARGV` in process: (exit status, non-empty stderr lines)."""
    from btard.cli import main

    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "step/s" not in ln]
    return code, err


@pytest.mark.parametrize(
    "args",
    [
        ["--steps", "-5"],
        ["--eval-every", "0"],
        ["--threads", "0"],
        ["--tau", "abc"],
        ["--tau", "-1"],
        ["--validators", "-1"],
        ["--peers", "0"],
        ["--byzantine", "2", "--peers", "4", "--attack", "sign-flip"],  # 2·2 ≥ 4 − 1
        ["--byzantine", "7", "--validators", "3", "--attack", "sign-flip"],  # the old README experiment
        ["--byzantine", "1", "--peers", "5"],  # no --attack
        ["--attack-param", "oops", "--byzantine", "1", "--peers", "5", "--attack", "sign-flip"],
    ],
)
def test_simulate_rejects_bad_input_with_one_line_and_status_2(args, capsys):
    code, err = run_cli(["simulate", "--task", "digits", *args], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("btard simulate: error:"), err


def test_honest_majority_among_contributors_is_required():
    from btard.sim.runner import honest_majority_error

    assert honest_majority_error(16, 7, 3) is not None  # 7 of 13 contributors
    assert honest_majority_error(16, 7, 2) is not None  # 7 of 14: a tie is no majority
    assert honest_majority_error(16, 7, 1) is None  # 7 of 15
    assert honest_majority_error(16, 6, 3) is None  # 6 of 13
    with pytest.raises(ValueError, match="no honest majority"):
        SimConfig(task="digits", peers=16, byzantine=7, validators=3, attack="sign-flip")
    with pytest.raises(ValueError, match="no honest majority"):
        SimConfig(task="digits", peers=8, byzantine=4, attack="sign-flip", aggregator="median")
    SimConfig(task="digits", peers=16, byzantine=7, validators=1, attack="sign-flip")


def test_experiment_configs_are_checked_at_load(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('task = "digits"\npeers = 16\nbyzantine = 7\nvalidators = 3\n')
    with pytest.raises(ValueError, match="no honest majority"):
        ExperimentConfig.load(bad)
    code, err = run_cli(["experiment", str(bad), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and len(err) == 1 and "no honest majority" in err[0]
    assert not (tmp_path / "out").exists()
    code, err = run_cli(["experiment", str(tmp_path / "missing.toml")], capsys)
    assert code == 2 and len(err) == 1


def test_shipped_experiment_configs_are_safe():
    from pathlib import Path

    configs = sorted(Path(__file__).resolve().parents[2].joinpath("experiments").glob("*.toml"))
    assert configs
    for path in configs:
        cfg = ExperimentConfig.load(path)  # raises if refused
        assert 2 * cfg.byzantine < cfg.peers - cfg.validators, path


def test_no_honest_peer_left_halts_with_a_clear_error():
    """Issue 11: with every honest peer gone the simulator raised `RuntimeError: stack expects a non-empty
    TensorList` (or an IndexError)."""
    from btard.sim.runner import SimulationHalted

    for attack in ("sign-flip", "alie"):
        s = sim(attack=attack, peers=5, byzantine=1, steps=4)
        for p in s.ids[1:]:
            s.harness.peers.pop(p)
        with pytest.raises(SimulationHalted, match="no honest peer"):
            s.run()


def _nan_from(task, step_from: int):
    calls = {"n": 0}
    original = task.compute_gradients

    def compute_gradients(params, seeds, **kw):
        out = original(params, seeds, **kw)
        calls["n"] += 1
        if calls["n"] > step_from:
            out = [torch.full_like(g, float("nan")) for g in out]
        return out

    task.compute_gradients = compute_gradients
    return task


def test_a_model_that_outputs_nan_halts_with_a_clear_error():
    from btard.sim.runner import SimulationHalted

    s = sim(attack="sign-flip", peers=5, byzantine=1, steps=6)
    _nan_from(s.task, 2)
    with pytest.raises(SimulationHalted, match="not finite"):
        s.run()
    assert len(s.metrics) == 2


def test_a_baseline_keeps_running_on_nan_gradients():
    s = sim(attack="sign-flip", peers=5, byzantine=1, steps=4, aggregator="mean")
    _nan_from(s.task, 1)
    s.run()
    assert len(s.metrics) == 4


def test_simulate_cli_reports_a_halt_in_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "nan_task.py").write_text(
        "import torch\n"
        "from btard.training import get_task\n"
        "def factory(**kw):\n"
        "    task = get_task('digits', **kw)\n"
        "    original = task.compute_gradients\n"
        "    def compute_gradients(params, seeds, **k):\n"
        "        return [torch.full_like(g, float('nan')) for g in original(params, seeds, **k)]\n"
        "    task.compute_gradients = compute_gradients\n"
        "    return task\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    code, err = run_cli(["simulate", "--task", "nan_task:factory", "--peers", "4", "--steps", "3"], capsys)
    assert code == 1
    assert len(err) == 1 and err[0].startswith("btard simulate: error: run halted:"), err


def test_experiment_grid_records_a_halted_run(tmp_path, monkeypatch):
    import btard.sim.runner as runner

    original = runner.Simulator.run

    def halting_run(self, *a, **kw):
        if self.cfg.attack:
            raise runner.SimulationHalted("step 0: test halt")
        return original(self, *a, **kw)

    monkeypatch.setattr(runner.Simulator, "run", halting_run)
    cfg = ExperimentConfig(
        task="digits", peers=5, byzantine=1, steps=2, eval_every=2, attacks=[{"name": "sign-flip"}], jobs=1
    )
    res = run_experiment(cfg, tmp_path, log=lambda *_: None)
    halted = [r for r in res["runs"] if r["halted"]]
    assert len(halted) == 2 and "halted" in res["table"]
