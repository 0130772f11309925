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
    s = sim(attack=attack, attack_params=params, validators=2, steps=40)
    s.run()
    summary = s.summary()
    assert summary["honest_banned"] == []
    assert summary["byzantine_not_banned"] == [], summary
    assert all(b["step"] >= 3 for b in s.ban_log)


def test_no_defense_breaks_under_sign_flip_while_btard_trains():
    mean = sim(attack="sign-flip", aggregator="mean")
    mean.run()
    btard = sim(attack="sign-flip", validators=2)
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
    s = sim(attack=f"{tmp_path / 'my_attack.py'}:Scale", validators=2, steps=30)
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
            peers=3,
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
