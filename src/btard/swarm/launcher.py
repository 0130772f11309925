"""A local swarm: `btard peer` subprocesses on loopback, their progress, and a summary a newcomer can read.

`LocalSwarm` starts peer 0 (the genesis coordinator), reads its address, starts the others with it as their
initial peer, and collects every peer's JSON events. Peer i writes to ``<run_dir>/peer-<i>/`` (identity,
metrics, audit log, checkpoints, stderr). `summarize` turns the events and files into a report: who was banned,
when and why, whether the honest peers ended bit-identical, the accuracy, step times, audit verification.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from btard.crypto import Identity
from btard.protocol.events import BanReason

START_TIMEOUT_S = 90.0  # importing torch and hivemind and starting p2pd, on a loaded 2-core machine
LINGER_S = 3.0  # how long non-honest peers may run on after the last honest peer exited


@dataclass
class PeerRole:
    """What a peer of a local swarm does besides the honest protocol."""

    attack: str | None = None
    attack_params: dict = field(default_factory=dict)
    attack_start: int = 0
    label: str = ""
    crash_at: str | None = None  # "STEP:PHASE": kill -9 itself there (fault injection)
    joiner: bool = False  # sync only: downloads and verifies the state from the members, then stops
    # A late joiner: started with the others but stays out of the genesis, and joins the running swarm once
    # it is at this step (the same path as a peer started later; process start-up takes longer than a short
    # test run).
    join_at_step: int | None = None
    extra_args: list[str] = field(default_factory=list)  # more `btard peer` arguments for this peer
    exec_prefix: list[str] = field(default_factory=list)  # runs the peer through it, e.g. `ip netns exec NS`

    @property
    def honest(self) -> bool:
        """An honest member of the run (a joiner is honest but never a member)."""
        return self.attack is None and self.crash_at is None and not self.joiner

    def describe(self) -> str:
        if self.label:
            return self.label
        if self.attack:
            return f"attack {self.attack}"
        if self.joiner:
            return "late joiner (state download)"
        return f"crashes at {self.crash_at}" if self.crash_at else "honest"


@dataclass
class SwarmConfig:
    """A local swarm. Peer 0 coordinates the genesis and should be honest; ``roles`` maps peer index to role."""

    peers: int = 8
    min_peers: int | None = None  # the genesis waits for this many (default: all `peers`)
    roles: dict[int, PeerRole] = field(default_factory=dict)
    task: str = "mnist"
    task_overrides: dict = field(default_factory=dict)
    steps: int = 60
    phase_timeout: float = 2.0
    validators: int = 1
    run_dir: str = "runs/swarm"
    run_name: str = "btard-local"
    checkpoint_every: int = 0
    resume: bool = False  # every peer resumes from the newest checkpoint in its own directory
    eval_every: int = 0  # peer 0 evaluates every K steps on `eval_examples` test examples
    eval_final: bool = True  # peer 0 evaluates the final parameters on the whole test set
    timeout: float = 600.0  # the whole run, after which every peer is killed
    extra_args: list[str] = field(default_factory=list)  # passed to every `btard peer`
    env: dict[str, str] = field(default_factory=dict)  # extra environment variables of the peer processes

    def role(self, i: int) -> PeerRole:
        return self.roles.get(i, PeerRole())

    @property
    def genesis_peers(self) -> int:
        """Peers in the genesis (all but the late joiners)."""
        return self.peers - sum(1 for r in self.roles.values() if r.join_at_step is not None)


@dataclass
class PeerRun:
    """One peer's process and what it reported."""

    index: int
    role: PeerRole
    directory: Path
    process: subprocess.Popen
    protocol_id: str  # hex public key (its key file is created before the process starts)
    info: dict = field(default_factory=dict)  # its "listening" event
    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    done: dict | None = None
    crashed_at: dict | None = None
    returncode: int | None = None

    @property
    def short(self) -> str:
        return self.protocol_id[:8]


class LocalSwarm:
    """Use as a context manager (every child is killed on exit): ``with LocalSwarm(cfg) as s: s.wait()``."""

    def __init__(self, config: SwarmConfig, on_event: Callable[[PeerRun, dict], None] | None = None) -> None:
        self.cfg = config
        self.root = Path(config.run_dir)
        self.on_event = on_event or (lambda run, ev: None)
        self.peers: list[PeerRun] = []
        self._events: queue.Queue[tuple[int, dict | None]] = queue.Queue()
        self.started_at = 0.0

    def __enter__(self) -> LocalSwarm:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    # ------------------------------------------------------------------ processes
    def _command(self, i: int) -> list[str]:
        cfg, role = self.cfg, self.cfg.role(i)
        d = self.root / f"peer-{i:02d}"
        cmd = [
            *role.exec_prefix, sys.executable, "-m", "btard.cli", "peer", "--json", "--stdin-lifeline",
            "--task", cfg.task,
            "--run-name", cfg.run_name,
            "--run-dir", str(d),
            "--steps", str(cfg.steps),
            "--min-peers", str(cfg.min_peers or cfg.genesis_peers),
            "--phase-timeout", str(cfg.phase_timeout),
            "--validators", str(cfg.validators),
            "--checkpoint-every", str(cfg.checkpoint_every),
        ]  # fmt: skip
        for k, v in cfg.task_overrides.items():
            cmd += ["--task-param", f"{k}={json.dumps(v)}"]
        if i > 0:
            cmd += ["--initial-peers", "-"]  # peer 0's address, written to stdin once it is known
        if cfg.resume:
            cmd += ["--resume", str(d)]
        if i == 0:
            if cfg.eval_every:
                cmd += ["--eval-every", str(cfg.eval_every)]
            if cfg.eval_final:
                cmd += ["--eval-final"]
        if role.attack:
            cmd += ["--attack", role.attack, "--attack-start", str(role.attack_start)]
            for k, v in role.attack_params.items():
                cmd += ["--attack-param", f"{k}={json.dumps(v)}"]
        if role.crash_at:
            cmd += ["--crash-at", role.crash_at]
        if role.joiner:
            cmd += ["--sync-only"]
        if role.join_at_step is not None:
            cmd += ["--join-at-step", str(role.join_at_step)]
        return cmd + list(cfg.extra_args) + list(role.extra_args)

    def _spawn(self, i: int) -> PeerRun:
        d = self.root / f"peer-{i:02d}"
        d.mkdir(parents=True, exist_ok=True)
        if not self.cfg.resume:  # a fresh run: drop what an earlier run left here (keep the identity)
            for old in ("metrics.jsonl", "stderr.log", *(f.name for f in d.glob("audit*.jsonl"))):
                (d / old).unlink(missing_ok=True)
            shutil.rmtree(d / "checkpoints", ignore_errors=True)
        identity = Identity.load_or_create(d / "identity.key")
        env = {
            **os.environ,
            "GOLOG_LOG_LEVEL": "error",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            **self.cfg.env,
        }
        with open(d / "stderr.log", "ab") as err:
            proc = subprocess.Popen(
                self._command(i),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                text=True,
                bufsize=1,
            )
        run = PeerRun(i, self.cfg.role(i), d, proc, identity.peer_id.hex())
        threading.Thread(target=self._pump, args=(i, proc), daemon=True).start()
        return run

    def _pump(self, i: int, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with contextlib.suppress(ValueError):
                ev = json.loads(line)
                if isinstance(ev, dict) and "event" in ev:
                    self._events.put((i, ev))
        self._events.put((i, None))

    def start(self) -> None:
        """Start every peer at once (imports and data loading overlap); the followers get peer 0's address on
        their stdin as soon as peer 0 reports it."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.started_at = time.monotonic()
        try:
            for i in range(self.cfg.peers):
                self.peers.append(self._spawn(i))
            deadline = time.monotonic() + START_TIMEOUT_S
            first = self.peers[0]
            while not first.info:
                if first.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"peer 0 did not start (exit code {first.returncode}; see {first.directory})"
                    )
                self._next(0.5)
        except BaseException:  # __exit__ does not run when __enter__ fails: never leave children behind
            self.kill()
            raise
        for run in self.peers[1:]:
            assert run.process.stdin is not None
            # stdin stays open: it is the peers' lifeline (they exit when it closes, i.e. when we are gone)
            with contextlib.suppress(OSError):  # a peer that already died is reported by wait()
                run.process.stdin.write(" ".join(first.info["maddrs"]) + "\n")
                run.process.stdin.flush()

    def _next(self, timeout: float) -> bool:
        """Handle one event (False if none came within ``timeout``)."""
        try:
            i, ev = self._events.get(timeout=timeout)
        except queue.Empty:
            return False
        run = self.peers[i]
        if ev is None:
            run.returncode = run.process.wait()
            self._clean_up_after(run)
            self.on_event(run, {"event": "exit", "returncode": run.returncode})
            return True
        kind = ev["event"]
        if kind == "listening":
            run.info = ev
        elif kind == "step":
            run.steps.append(ev)
        elif kind == "eval":
            run.evals.append(ev)
        elif kind == "done":
            run.done = ev
        elif kind == "crash":
            run.crashed_at = ev
        self.on_event(run, ev)
        return True

    def _clean_up_after(self, run: PeerRun) -> None:
        """A killed peer leaves hivemind's unix socket file behind (its p2pd dies with it): remove it."""
        sock = run.info.get("client_socket")
        if run.returncode not in (0, None) and sock and run.done is None:
            with contextlib.suppress(OSError):
                os.remove(sock)

    def wait(self) -> list[PeerRun]:
        """Handle events until every peer exited (or the timeout, then kill them all and raise). Once every
        honest member has exited, the others (attackers left alone, say) get ``LINGER_S``, then are killed."""
        deadline = self.started_at + self.cfg.timeout
        honest_done: float | None = None
        while any(r.returncode is None for r in self.peers):
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"the swarm did not finish within {self.cfg.timeout} s")
            if honest_done is None and all(r.returncode is not None for r in self.peers if r.role.honest):
                honest_done = time.monotonic()
            if honest_done is not None and time.monotonic() > honest_done + LINGER_S:
                self.kill()
            self._next(0.5)
        return self.peers

    def kill(self) -> None:
        for run in self.peers:
            if run.process.poll() is None:
                run.process.kill()
                run.process.wait()
            if run.returncode is None:
                run.returncode = run.process.returncode
                self._clean_up_after(run)


# ---------------------------------------------------------------------------------------------- the report
def summarize(cfg: SwarmConfig, peers: list[PeerRun], wall_seconds: float) -> dict:
    """What happened, from the peers' events and files (see the module docstring)."""
    from btard.protocol.audit import verify_log

    honest = [r for r in peers if r.role.honest]
    witness = next((r for r in honest if r.steps), None)  # the honest peer whose view we report
    bans: dict[str, dict] = {}
    excluded: dict[str, int] = {}
    for r in honest:
        for st in r.steps:
            for b in st["bans"]:
                bans.setdefault(b["peer_id"], {**b, "step": st["step"]})
            for p in st["excluded"]:
                excluded.setdefault(p, st["step"])
    by_id = {r.protocol_id: r for r in peers}
    finished = [r for r in honest if r.done and r.done["status"] == "finished"]
    hashes = {r.done["params_hash"] for r in finished if r.done}
    audits = {}
    for r in peers:
        logs = sorted(r.directory.glob("audit*.jsonl"))
        if logs:
            reps = [verify_log([ln for ln in f.read_text().splitlines() if ln.strip()]) for f in logs]
            audits[r.index] = {
                "ok": all(x.ok for x in reps),
                "steps": sum(x.steps for x in reps),
                "messages": sum(x.messages for x in reps),
                "problems": [p for x in reps for p in x.problems][:5],
            }
    steps = witness.steps if witness else []
    times = [s["step_seconds"] for s in steps]
    slowest_phase = max((max(s["phases"].values(), default=0.0) for s in steps), default=0.0)
    coordinator = peers[0] if peers else None
    evals = [(e["step"], e["accuracy"]) for e in coordinator.evals] if coordinator else []
    return {
        "task": cfg.task,
        "peers": cfg.peers,
        "steps": cfg.steps,
        "phase_timeout": cfg.phase_timeout,
        "wall_seconds": round(wall_seconds, 1),
        "peer_reports": [
            {
                "index": r.index,
                "id": r.short,
                "role": r.role.describe(),
                "honest": r.role.honest,
                "status": (r.done or {}).get("status")
                or ("killed" if r.crashed_at else f"exit {r.returncode}"),
                "banned": bans.get(r.protocol_id),
                "excluded_at": excluded.get(r.short),
                "steps": len(r.steps),
                "joined_at": r.steps[0]["step"] if r.role.join_at_step is not None and r.steps else None,
                "contributed_from": next(
                    (st["step"] for st in r.steps if st["role"] in ("contributor", "validator")), None
                )
                if r.role.join_at_step is not None
                else None,
            }
            for r in peers
        ],
        "honest_banned": [b for pid, b in bans.items() if pid in by_id and by_id[pid].role.honest],
        "honest_finished": len(finished),
        "honest_identical": len(finished) == len(honest) and len(hashes) == 1,
        "params_hash": next(iter(hashes)) if len(hashes) == 1 else None,
        "final_accuracy": (coordinator.done or {}).get("accuracy") if coordinator else None,
        "evals": evals,
        "step_seconds_median": round(statistics.median(times), 3) if times else None,
        "step_seconds_max": round(max(times), 3) if times else None,
        "slowest_phase_seconds": round(slowest_phase, 3),
        "audit": audits,
    }


def plot(cfg: SwarmConfig, peers: list[PeerRun], report: dict, path: Path) -> None:
    """Training loss per step (peer 0's batch), test accuracy, and every ban."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    witness = next((r for r in peers if r.role.honest and r.steps), None)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if witness is not None:
        xs = [s["step"] + 1 for s in witness.steps]
        loss = [s["loss"] for s in witness.steps]
        k = max(1, len(loss) // 25)  # moving average over ~4% of the run
        smooth = [statistics.fmean(loss[max(0, i - k + 1) : i + 1]) for i in range(len(loss))]
        ax.plot(xs, loss, lw=0.7, color="tab:blue", alpha=0.3)
        ax.plot(
            xs, smooth, lw=1.5, color="tab:blue", label=f"training loss (one peer's batches, mean of {k})"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if report["evals"]:
        ax2 = ax.twinx()
        ax2.plot(*zip(*report["evals"]), "o-", color="tab:green", ms=4, label="test accuracy")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("test accuracy")
        ax2.legend(loc="center right", fontsize=8)
    banned = [p for p in report["peer_reports"] if p["banned"]]
    for p, color in zip(banned, ["red", "darkorange", "purple", "brown", "magenta", "olive"] * len(banned)):
        s = p["banned"]["step"] + 1
        ax.axvline(s, color=color, ls="--", lw=1, label=f"step {s}: banned peer {p['index']} ({p['role']})")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"BTARD swarm on loopback: {cfg.peers} peers, task {cfg.task}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# What each verdict means, for the summary, by its `BanReason` code.
EXPLANATIONS = {
    BanReason.FALSE_ACCUSATION: "it accused an honest peer with evidence that proves nothing",
    BanReason.VALIDATION: "a validator recomputed its gradient from the public seed: it had sent something else",
    BanReason.FAILED_CHECK: "its aggregate is not the CenteredClip of the parts it received",
    BanReason.WRONG_INPUTS: "its aggregate left out (or added) senders' parts",
    BanReason.COMMIT_MISMATCH: "it sent a gradient part that differs from its signed commitment",
    BanReason.EQUIVOCATION: "it signed two different messages for one slot",
    BanReason.MPRNG_MISMATCH: "its revealed random secret does not match its commitment",
    BanReason.WRONG_PROJECTION: "it reported false projections of its gradient",
    BanReason.NONFINITE: "it sent NaN/Inf values",
    BanReason.BAD_SHAPE: "it sent a part, commit or report that does not fit the step",
}


def explain(ban: dict) -> str:
    """What a ban recorded in a metrics line means (by its code; empty for an unknown one)."""
    try:
        return EXPLANATIONS[BanReason(ban.get("code"))]
    except ValueError:
        return ""


def format_report(report: dict, root: Path) -> str:
    lines = [f"\nSummary ({report['wall_seconds']} s, {report['steps']} steps, {report['peers']} peers):"]
    for p in report["peer_reports"]:
        if p["banned"]:
            b = p["banned"]
            by = f", accused by {b['accuser']}" if b["accuser"] else ""
            why = explain(b)
            fate = f"BANNED at step {b['step'] + 1}: {b['reason']}{by}" + (f"\n{'':42}({why})" if why else "")
        elif p["excluded_at"] is not None:
            fate = f"excluded at step {p['excluded_at'] + 1} (went silent)"
        elif p.get("joined_at") is not None:
            fate = (
                f"admitted; observed step {p['joined_at'] + 1}, on probation (validated, not aggregated), "
                f"full member from step {(p['contributed_from'] or 0) + 1}; {p['status']}"
            )
        else:
            fate = p["status"]
        lines.append(f"  peer {p['index']} ({p['id']}) {p['role']:<32} {fate}")
    honest_banned = report["honest_banned"]
    lines.append(f"  honest peers banned: {len(honest_banned) or 'none'}")
    if report["honest_identical"]:
        lines.append(
            f"  honest peers finished with bit-identical parameters (H(x) {report['params_hash'][:16]})"
        )
    else:
        lines.append(f"  WARNING: honest peers do not agree ({report['honest_finished']} finished)")
    if report["final_accuracy"] is not None:
        lines.append(f"  test accuracy of the final model: {report['final_accuracy']:.4f} (whole test set)")
    if report["step_seconds_median"] is not None:
        lines.append(
            f"  step time: median {report['step_seconds_median']} s, max {report['step_seconds_max']} s; "
            f"slowest phase {report['slowest_phase_seconds']} s (phase timeout {report['phase_timeout']} s)"
        )
    bad = {i: a for i, a in report["audit"].items() if not a["ok"]}
    lines.append(
        f"  audit logs: {len(report['audit']) - len(bad)} of {len(report['audit'])} verify "
        f"(signatures, hash chain, r^t, self-contained ban evidence)"
        + "".join(f"\n    peer {i}: {a['problems']}" for i, a in bad.items())
    )
    lines.append(
        f"  files: {root}/progress.png, {root}/summary.json, {root}/peer-*/metrics.jsonl, "
        f"{root}/peer-*/audit.jsonl (check one: btard audit {root}/peer-00/audit.jsonl)"
    )
    return "\n".join(lines)


def run_and_report(cfg: SwarmConfig, *, title: str, out: Callable[[str], None] = print) -> int:
    """Run a local swarm with live progress (one line per step), then print and save the summary."""
    from btard.swarm.cli import format_step

    out(f"{title}\nstarting {cfg.peers} peer processes (run directory {cfg.run_dir}) ...")
    for i in range(cfg.peers):
        role = cfg.role(i)
        if role.attack:
            out(f"  peer {i}: {role.describe()} (from step {role.attack_start + 1})")
        elif not role.honest:
            out(f"  peer {i}: {role.describe()}")

    def on_event(run: PeerRun, ev: dict) -> None:
        kind = ev["event"]
        if kind == "genesis" and run.index == 0:
            out(
                f"all {len(ev['members'])} peers present: training starts (phase timeout {ev['phase_timeout']} s)"
            )
        elif kind == "step" and run is _witness():
            out(format_step(ev, cfg.steps))
        elif kind == "eval" and run.index == 0:
            out(f"     test accuracy at step {ev['step']}: {ev['accuracy']:.4f} ({ev['examples']} examples)")

    def _witness() -> PeerRun | None:
        return next((r for r in swarm.peers if r.role.honest and r.returncode is None), None)

    swarm = LocalSwarm(cfg, on_event)
    start = time.monotonic()
    with swarm:
        peers = swarm.wait()
    report = summarize(cfg, peers, time.monotonic() - start)
    root = Path(cfg.run_dir)
    (root / "summary.json").write_text(json.dumps(report, indent=2))
    plot(cfg, peers, report, root / "progress.png")
    out(format_report(report, root))
    ok = report["honest_identical"] and not report["honest_banned"]
    return 0 if ok else 1


def demo_config(
    run_dir: str = "runs/demo", steps: int | None = None, phase_timeout: float | None = None
) -> SwarmConfig:
    """`btard demo`: 8 peers train real MNIST; peer 5 flips its gradient ×1000 (caught by validators), peer 6
    publishes a wrong aggregate (caught by the projection check), peer 7 falsely accuses an honest peer; a 9th
    peer joins the running swarm at step 40 (observer step, probation, then a full member)."""
    roles = {
        5: PeerRole("sign-flip", {"k": 1000.0}, 0, label="gradient attack: sign flip x1000"),
        6: PeerRole("wrong-aggregate", {"scale": 1.0}, 3, label="protocol attack: wrong aggregate"),
        7: PeerRole("false-accusation", {}, 6, label="false accuser"),
        8: PeerRole(join_at_step=40, label="late joiner (at step 40)"),
    }
    return SwarmConfig(
        peers=9,
        roles=roles,
        task="mnist",
        steps=steps or 200,
        phase_timeout=phase_timeout or 2.0,
        validators=2,
        run_dir=run_dir,
        run_name="btard-demo",
        eval_every=50,
        eval_final=True,
        timeout=280.0,
    )
