"""Many peers in one process: BTARD over the in-memory network, or a baseline aggregation rule.

With ``aggregator="btard"`` every peer runs the real protocol state machine (commitments, MPRNG, projections,
validators, accusations, bans) over the seeded in-memory network; honest peers must end every step with the
identical ĝ, which the simulator checks. The baselines are the rules the paper compares against, applied to
full gradient vectors: ``mean`` (no defense) and server-side ``median``, ``trimmed-mean``, ``krum``,
``geomedian`` and ``cclip-server`` (CenteredClip on a trusted server).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from btard.aggregation import centered_clip, get_aggregator
from btard.attacks.base import Attack, AttackContext, AttackKind, AttackSchedule, GradientAttack, apply_attack
from btard.attacks.registry import get_attack
from btard.crypto import Identity, digest, params_digest, short_id
from btard.protocol.audit import AuditLog
from btard.protocol.harness import Harness, build_peers
from btard.protocol.peer import Behaviour, ProtocolConfig, StepResult
from btard.training import Task, get_task
from btard.transport.memory import MemoryNetwork

BASELINES = ("mean", "median", "trimmed-mean", "krum", "geomedian", "cclip-server")
AGGREGATORS = ("btard", *BASELINES)


class SimulationHalted(RuntimeError):
    """The run cannot continue (no honest peer left, or BTARD's parameters are no longer finite); the message is
    one line for the user. The metrics of the steps done so far are kept in `Simulator.metrics`."""


def honest_majority_error(peers: int, byzantine: int, validators: int) -> str | None:
    """Why a configuration has no guaranteed honest majority among the peers whose gradients are aggregated,
    or None if it has one.

    Validators compute no gradient in their step, so with n peers of which b Byzantine and m validators per step
    the aggregated contributors are n − m, of which up to b are Byzantine (every validator honest): the
    majority holds in every step iff 2b < n − m (for a baseline rule, m = 0: 2b < n). The honest peers' m
    validators are drawn one step ahead, so the attackers know which steps would give them a majority."""
    contributors = peers - validators
    if 2 * byzantine < contributors:
        return None
    return (
        f"{byzantine} Byzantine of {peers} peers with {validators} validator(s) per step leaves no honest "
        f"majority among the {contributors} aggregated contributors (need 2·byzantine < peers − validators, "
        f"i.e. byzantine ≤ {max((contributors - 1) // 2, 0)})"
    )


@dataclass
class SimConfig:
    """One simulated run. Peers 0..b−1 of the identity order are Byzantine."""

    task: str = "mnist"
    task_overrides: dict = field(default_factory=dict)
    peers: int = 16
    byzantine: int = 0
    attack: str | None = None
    attack_params: dict = field(default_factory=dict)
    attack_start: int = 0
    attack_every: int = 1
    attack_stop: int | None = None
    aggregator: str = "btard"
    tau: float | str = "adaptive"
    validators: int = 1
    num_projections: int = 4
    steps: int = 100
    seed: int = 0
    eval_every: int = 50
    eval_examples: int | None = 2000
    out_dir: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        """Raise ValueError (one-line message) for a configuration the simulator refuses."""
        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {self.aggregator!r}; choose from {', '.join(AGGREGATORS)}")
        for name, minimum in (
            ("peers", 1),
            ("byzantine", 0),
            ("validators", 0),
            ("steps", 1),
            ("eval_every", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
        if self.attack_start < 0 or self.attack_every < 1:
            raise ValueError("need attack_start ≥ 0 and attack_every ≥ 1")
        if self.eval_examples is not None and self.eval_examples < 1:
            raise ValueError(f"eval_examples must be ≥ 1 or None, got {self.eval_examples!r}")
        if not 0 <= self.byzantine < self.peers:
            raise ValueError("need 0 ≤ byzantine < peers")
        if self.byzantine and not self.attack:
            raise ValueError("Byzantine peers need an --attack")
        if isinstance(self.tau, str) and self.tau != "adaptive":
            try:
                self.tau = float(self.tau)
            except ValueError:
                raise ValueError(f"tau must be a positive number or 'adaptive', got {self.tau!r}") from None
        if not isinstance(self.tau, str) and not (
            isinstance(self.tau, int | float) and 0 < self.tau < math.inf
        ):
            raise ValueError(f"tau must be a positive number or 'adaptive', got {self.tau!r}")
        why = honest_majority_error(
            self.peers, self.byzantine, self.validators if self.aggregator == "btard" else 0
        )
        if why:
            raise ValueError(f"refused: {why}")
        if self.aggregator == "krum" and self.peers - self.byzantine - 2 < 1:
            raise ValueError("krum needs peers − byzantine − 2 ≥ 1")


@contextlib.contextmanager
def frozen_gc() -> Iterator[None]:
    """Keep the objects alive when the block starts (modules, the model, the data) out of the cyclic garbage
    collector's passes while it runs (`gc.freeze`), and give them back at its end (`gc.unfreeze`). A step
    allocates many short-lived objects, so the collector runs often, and each of its older-generation passes
    otherwise walks every object of the process (~300k with torch loaded): ~15 ms of a 16-peer MNIST step.
    Garbage is collected before freezing, so nothing is kept that was already unreachable."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@dataclass
class StepMetrics:
    step: int
    loss: float
    wall_time: float
    grad_norm: float
    bans: list[dict]
    excluded: list[str]
    clipped: int
    clip_iterations: int
    active: int
    attack_active: bool
    test_accuracy: float | None = None
    test_loss: float | None = None


class Simulator:
    """Runs `SimConfig`; `run()` returns the per-step metrics and writes the run directory if configured."""

    def __init__(self, config: SimConfig, task: Task | None = None) -> None:
        self.cfg = config
        self.task = task or get_task(config.task, **config.task_overrides)
        self.identities = [
            Identity.from_seed(hashlib.sha256(f"btard-sim/{config.seed}/{i}".encode()).digest())
            for i in range(config.peers)
        ]
        self.ids = [i.peer_id for i in self.identities]
        self.byzantine = self.ids[: config.byzantine]
        self.attack: Attack | None = (
            get_attack(config.attack, **config.attack_params) if config.attack else None
        )
        self.schedule = AttackSchedule(
            start=config.attack_start, every=config.attack_every, stop=config.attack_stop
        )
        layout = self.task.layout
        self.param_slices = tuple(
            (o, o + int(torch.Size(s).numel())) for o, s in zip(layout.offsets, layout.shapes)
        )
        self.params = self.task.initial_params()
        self.opt = self.task.make_optimizer()
        self.r_prev = digest("genesis")
        self.history: dict[int, tuple[torch.Tensor, bytes]] = {}  # step -> (params, r_prev) for the oracle
        self.true_grads: dict[int, dict[bytes, torch.Tensor]] = {}
        self.metrics: list[StepMetrics] = []
        self.ban_log: list[dict] = []
        self.out = Path(config.out_dir) if config.out_dir else None
        self.audit: AuditLog | None = None
        self.harness: Harness | None = None
        if (
            self.attack is not None
            and self.attack.kind == AttackKind.PROTOCOL
            and config.aggregator != "btard"
        ):
            raise ValueError(f"protocol attack {config.attack!r} needs --aggregator btard")
        if config.aggregator == "btard":
            self._build_protocol()

    # ------------------------------------------------------------------ setup
    def _build_protocol(self) -> None:
        cfg = self.cfg
        pcfg = ProtocolConfig(
            run_id=digest("sim-run", cfg.seed, cfg.task)[:16],
            dim=self.task.dim,
            tau=cfg.tau,
            validators=cfg.validators,
            num_projections=cfg.num_projections,
        )
        behaviours: dict[int, Behaviour] = {}
        if self.attack is not None and self.attack.kind == AttackKind.PROTOCOL:
            for i in range(cfg.byzantine):
                behaviours[i] = get_attack(cfg.attack, start=cfg.attack_start, **cfg.attack_params)  # type: ignore[assignment]
        audits = {}
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            honest = self.identities[cfg.byzantine]
            self.audit = AuditLog(honest, path=self.out / "audit.jsonl")
            audits[honest.peer_id] = self.audit
        peers = build_peers(
            self.identities, pcfg, oracle=self._oracle, behaviours=behaviours, seed=cfg.seed, audits=audits
        )
        self.harness = Harness(peers, MemoryNetwork(cfg.seed))

    def _oracle(self, step: int, pid: bytes) -> torch.Tensor:
        """The gradient peer `pid` had to compute at `step` (recomputed from public data if not cached)."""
        cached = self.true_grads.get(step, {}).get(pid)
        if cached is not None:
            return cached
        params, r_prev = self.history[step]
        return self.task.compute_gradient(params, self.task.batch_seed(r_prev, step, pid))

    # ------------------------------------------------------------------ one step
    def _gradients(self, step: int, contributors: list[bytes]) -> tuple[dict[bytes, torch.Tensor], bool]:
        """Each contributor's vector for this step (attacked for Byzantine peers) and whether the attack ran."""
        seeds = [self.task.batch_seed(self.r_prev, step, p) for p in contributors]
        true = self.task.compute_gradients(self.params, seeds)
        rows = dict(zip(contributors, true))
        self.true_grads[step] = rows
        out = dict(rows)
        attack = self.attack
        if not isinstance(attack, GradientAttack):
            return out, self.attack is not None and self.schedule.active(step, 0)
        byz = [p for p in contributors if p in self.byzantine]
        honest = torch.stack(
            [rows[p] for p in contributors if p not in self.byzantine]
        )  # non-empty: see step
        active = False
        for p in byz:
            idx = self.byzantine.index(p)
            seed = seeds[contributors.index(p)]

            def recompute(label_flip: bool = False, _seed: bytes = seed) -> torch.Tensor:
                return self.task.compute_gradient(self.params, _seed, label_flip=label_flip)

            ctx = AttackContext(
                step=step,
                peer_index=byz.index(p),
                peer_id=p,
                byzantine_ids=tuple(byz),
                own_gradient=rows[p],
                n=len(contributors),
                b=len(byz),
                seed=self.cfg.seed,
                honest_gradients=honest,
                compute_gradient=recompute,
                param_slices=self.param_slices,
            )
            attack.observe(ctx)
            if self.schedule.active(step, idx):
                out[p] = apply_attack(attack, ctx)
                active = True
        return out, active

    def _train_loss(self, step: int, pid: bytes) -> float:
        x, y = self.task.sample_batch(self.task.batch_seed(self.r_prev, step, pid))
        with torch.no_grad():
            model = self.task.model_with_params(self.params)
            return float(self.task.loss_fn(model(x.to(self.params.dtype) if x.is_floating_point() else x), y))

    def step(self, step: int) -> StepMetrics:
        t0 = time.perf_counter()
        self.history[step] = (self.params, self.r_prev)
        for old in [s for s in self.history if s < step - 1]:
            self.history.pop(old)
            self.true_grads.pop(old, None)
        if self.cfg.aggregator == "btard":
            ghat, info = self._btard_step(step)
        else:
            ghat, info = self._baseline_step(step)
        honest_probe = next(p for p in info["contributors"] if p not in self.byzantine)
        loss = self._train_loss(step, honest_probe)
        self.params = self.opt.step(self.params, ghat, step)
        if self.cfg.aggregator == "btard" and not bool(torch.isfinite(self.params).all()):
            # The baselines may diverge under attack (that is what they are compared for); BTARD's aggregate
            # is finite by construction, so non-finite parameters mean the training itself diverged.
            raise SimulationHalted(
                f"step {step}: the model's parameters are no longer finite (training diverged; "
                "try a smaller learning rate)"
            )
        m = StepMetrics(
            step=step,
            loss=loss,
            wall_time=time.perf_counter() - t0,
            grad_norm=float(ghat.norm()),
            bans=info.get("bans", []),
            excluded=info.get("excluded", []),
            clipped=info.get("clipped", 0),
            clip_iterations=info.get("clip_iterations", 0),
            active=len(info["contributors"]),
            attack_active=info["attack_active"],
        )
        self.ban_log.extend(m.bans)
        return m

    def _btard_step(self, step: int) -> tuple[torch.Tensor, dict]:
        h = self.harness
        assert h is not None
        contributors = [p for p, peer in h.peers.items() if not peer.is_validator]
        if not any(p not in self.byzantine for p in contributors):
            raise SimulationHalted(
                f"step {step}: no honest peer is left to contribute a gradient "
                f"({len(contributors)} contributor(s), all Byzantine); the run cannot continue"
            )
        grads, attack_active = self._gradients(step, contributors)
        if not all(bool(torch.isfinite(grads[p]).all()) for p in contributors if p not in self.byzantine):
            raise SimulationHalted(
                f"step {step}: honest gradients are not finite (the model outputs NaN/Inf: training diverged)"
            )
        inputs = {p: (grads.get(p) if not h.peers[p].is_validator else None) for p in h.peers}
        params_hash = params_digest(self.params)
        results = h.run_step(inputs, params_hash)
        honest = [results[p] for p in h.peers if p not in self.byzantine and p in results]
        if not honest:
            raise SimulationHalted(f"step {step}: no honest peer finished the step; the run cannot continue")
        ref: StepResult = honest[0]
        for r in honest[1:]:
            if not torch.equal(r.aggregate, ref.aggregate) or r.r != ref.r or r.verdicts != ref.verdicts:
                raise RuntimeError(f"honest peers disagree at step {step}: this is a bug, please report it")
        bans = [
            {
                "step": step,
                "peer": short_id(v.banned),
                "byzantine": v.banned in self.byzantine,
                "reason": v.reason,
                "accuser": short_id(v.accuser) if v.accuser else None,
            }
            for v in ref.verdicts
        ]
        for v in ref.verdicts:
            h.peers.pop(v.banned, None)
        for p in ref.excluded:
            h.peers.pop(p, None)
        self.r_prev = ref.r
        return ref.aggregate, {
            "contributors": contributors,
            "attack_active": attack_active,
            "bans": bans,
            "excluded": [short_id(p) for p in ref.excluded],
            "clipped": ref.clipped,
            "clip_iterations": ref.clip_iterations,
        }

    def _baseline_step(self, step: int) -> tuple[torch.Tensor, dict]:
        contributors = list(self.ids)
        grads, attack_active = self._gradients(step, contributors)
        x = torch.stack([grads[p] for p in contributors])
        info = {"contributors": contributors, "attack_active": attack_active}
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)  # a server would drop non-finite values
        if self.cfg.aggregator == "cclip-server":
            res = centered_clip(x, self.cfg.tau)
            info.update(clipped=res.n_clipped, clip_iterations=res.iterations)
            ghat = res.value
        else:
            kw = {"f": self.cfg.byzantine} if self.cfg.aggregator in ("trimmed-mean", "krum") else {}
            ghat = get_aggregator(self.cfg.aggregator, **kw)(x)
        self.r_prev = digest("baseline-r", self.r_prev, step)
        return ghat, info

    # ------------------------------------------------------------------ the run
    def run(self, on_step: Callable[[StepMetrics], None] | None = None) -> list[StepMetrics]:
        cfg = self.cfg
        bar = None
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, desc=f"{cfg.aggregator}/{cfg.attack or 'no attack'}", unit="step")
        metrics_file = None
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))
            metrics_file = open(self.out / "metrics.jsonl", "w")  # noqa: SIM115
        try:
            with frozen_gc():
                for t in range(cfg.steps):
                    m = self.step(t)
                    if (t + 1) % cfg.eval_every == 0 or t == cfg.steps - 1:
                        ev = self.task.evaluate(
                            self.params, None if t == cfg.steps - 1 else cfg.eval_examples
                        )
                        m.test_accuracy, m.test_loss = ev["accuracy"], ev["loss"]
                    self.metrics.append(m)
                    if metrics_file is not None:
                        metrics_file.write(json.dumps(asdict(m)) + "\n")
                        metrics_file.flush()
                    if bar is not None:
                        bar.update(1)
                        post = {"loss": f"{m.loss:.3f}", "bans": len(self.ban_log)}
                        if m.test_accuracy is not None:
                            post["acc"] = f"{m.test_accuracy:.3f}"
                        bar.set_postfix(post)
                    if on_step is not None:
                        on_step(m)
        finally:
            if bar is not None:
                bar.close()
            if metrics_file is not None:
                metrics_file.close()
            if self.audit is not None:
                self.audit.close()
        if self.out is not None:
            self.write_outputs()
        return self.metrics

    def summary(self) -> dict:
        accs = [(m.step, m.test_accuracy) for m in self.metrics if m.test_accuracy is not None]
        byz_bans = {b["peer"]: b["step"] for b in self.ban_log if b["byzantine"]}
        return {
            "task": self.task.name,
            "data": self.task.data_source,
            "aggregator": self.cfg.aggregator,
            "attack": self.cfg.attack,
            "peers": self.cfg.peers,
            "byzantine": self.cfg.byzantine,
            "steps": self.cfg.steps,
            "final_accuracy": accs[-1][1] if accs else None,
            "byzantine_banned": byz_bans,
            "byzantine_not_banned": [short_id(p) for p in self.byzantine if short_id(p) not in byz_bans],
            "honest_banned": [b for b in self.ban_log if not b["byzantine"]],
            "mean_step_seconds": sum(m.wall_time for m in self.metrics) / max(len(self.metrics), 1),
        }

    def write_outputs(self) -> None:
        assert self.out is not None
        summary = self.summary()
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        from btard.sim.plots import plot_run

        plot_run(self.metrics, self.cfg, self.out / "accuracy.png")
