"""One swarm peer process: bootstrap, then BTARD-SGD steps over libp2p until the last step.

The peer owns one `P2PTransport`, one `BtardPeer` (driven by `ProtocolDriver`) and the training state
(x^t, optimizer). Per step t it computes its gradient at x^t on the public seed ξ = H(r^{t−1}, t, id) in a
worker thread (validators skip this), runs the protocol step, applies ĝ with the task's optimizer, and
writes one metrics line. Its run directory holds ``metrics.jsonl``, ``audit.jsonl`` (``audit-from-step-<t>.jsonl``
after a resume) and ``checkpoints/``.

Bootstrap (the genesis) [decision]: the peer started without ``initial_peers`` is the run's *coordinator*,
for the genesis only. It waits until ``min_peers`` peers announced themselves in the DHT under the run name
(``announce``/``list_peers``), then signs a `Genesis` (members = the sorted protocol ids of all peers listed
at that moment, step, r, H(x), phase timeout, validators, a start time 2 s ahead) and sends it to every
member; after that it is an ordinary member. A follower accepts the genesis only from the libp2p peer of its
first ``initial_peers`` address (the transport authenticates that id) and checks it (task, H(x), its
checkpoint when resuming, the allow-list); until then it asks the coordinator for it (HELLO) every second, so
a lost genesis is resent. Every member then opens its connections to the others (PING) and begins the first
step at the start time (wall clock: members' clocks must agree to well under T). Because every honest peer
builds its member list from this one signed message, they all agree on it. After each step a peer begins the
next one at once, so peers stay within a message latency of each other.

Trust: the coordinator only chooses who starts (everything after follows from the protocol); an allow-list
(``allow_list``) restricts that choice, and every peer ignores records, control messages and genesis members
not on it. A peer that is not in the genesis stops with status ``not-a-member``.

Commitments: the H(x^t) a peer puts in its GRAD_COMMIT is `training_state_digest` (parameters and optimizer
state), so whatever state a newcomer downloads can be checked against what the majority committed.

Late joiners [decision]: a peer that is not in the genesis (started later with ``initial_peers``) joins the
running swarm. It asks the members for the step they are in (HELLO → STATUS), sends a signed JOIN naming that
step to every member it finds in the DHT, and repeats until admitted. Members keep JOINs with the step's public
items, so the ACCUSE-phase digest exchange makes every honest member admit the same joiners at the end of the
same step t (`BtardPeer._admitted`). Two members, drawn from r^t, then send the joiner a WELCOME: x^{t+1}, the
optimizer state, members, validators, observers and probation of step t+1. The joiner observes step t+1
(takes part in the MPRNG, commits nothing) and accepts a WELCOME only if a strict majority of the step's
GRAD_COMMITs, which it receives itself, carry that state's hash; then it applies ĝ^{t+1} like everyone and
contributes on probation (validated every step, its parts not aggregated) before it is a full member.

A peer started with ``sync_only`` never joins; it asks members (the bootstrap peer first) for their STATE:
x^t, the optimizer state, r^{t−1}, members and validators of step t, and the signed GRAD_COMMITs of step t.
It accepts the state only if a strict majority of the members committed its hash, saves it as a checkpoint
and stops (status ``synced``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from btard.attacks.base import AttackContext, AttackKind, AttackSchedule, GradientAttack, apply_attack
from btard.attacks.registry import get_attack, resolve_attack
from btard.crypto import Identity, digest, params_digest, short_id, training_state_digest
from btard.protocol.audit import AuditLog
from btard.protocol.messages import Join, Kind, Signed, encode
from btard.protocol.peer import GENESIS, Behaviour, BtardPeer, ProtocolConfig, StepResult
from btard.protocol.state import Phase
from btard.swarm.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from btard.swarm.control import (
    PING,
    ControlError,
    ControlKind,
    Genesis,
    Hello,
    State,
    StateRequest,
    Status,
    Welcome,
    decode_control,
    encode_genesis,
    encode_hello,
    encode_state,
    encode_state_request,
    encode_status,
    finite_timeout,
    is_control,
    verify_state,
)
from btard.swarm.driver import ProtocolDriver, StepTiming
from btard.training import Task, get_task
from btard.training.optim import FlatOptimizer
from btard.transport.base import Incoming

HELLO_INTERVAL_S = 1.0  # how often a follower asks the coordinator for the genesis until it has it
LIST_INTERVAL_S = 0.25  # how often the coordinator polls the DHT for announced peers
# The first step begins this long after the genesis is signed, at the same wall-clock time everywhere, and
# peers open their connections meanwhile: on a loaded 2-core machine, opening 110 libp2p connections (11 peers)
# inside the first step took ~2 s, right at the second deadline of a T = 1 s commit barrier.
START_DELAY_S = 2.0
MAX_START_WAIT_S = 60.0  # never wait longer than this for start_at (a coordinator with a wrong clock)
SYNC_REPLY_S = 5.0  # how long a joiner waits for one member's state (a few MB over one stream)
MAX_WAITING_JOINERS = 64  # requests held until our first step ends (more are dropped: they ask again)
JOIN_RESEND_S = 1.0  # a joiner asks for the current step and re-sends its JOIN this often until admitted
WELCOME_SERVERS = 2  # members (drawn from r) that send an admitted joiner its state
MAX_WELCOMES = 8  # WELCOMEs a joiner keeps (one per server; more are ignored)


@dataclass
class PeerRunConfig:
    """Settings of one swarm peer. Protocol settings (``phase_timeout``, ``validators``) are the coordinator's:
    followers adopt the values of the signed genesis, so every peer of a run uses the same `ProtocolConfig`.
    """

    task: str = "mnist"
    task_overrides: dict = field(default_factory=dict)
    run_name: str = "btard"  # the DHT key of the run (letters, digits, ".", "_", "-")
    initial_peers: list[str] = field(default_factory=list)  # [] = start a new swarm (be its coordinator)
    identity: str | None = None  # Ed25519 key file (created if missing); None = <run_dir>/identity.key
    run_dir: str = "runs/peer"
    min_peers: int = 4  # coordinator: start when this many peers (itself included) announced
    steps: int = 100  # train until step `steps` (absolute: a resumed run continues up to it)
    phase_timeout: float = 2.0  # T: each phase's deadlines are multiples of it (a step's worst case is 14·T)
    validators: int = 1
    attack: str | None = None  # a registered attack name or "module:Class" (makes this peer Byzantine)
    attack_params: dict = field(default_factory=dict)
    attack_start: int = 0
    attack_seed: int = 0
    checkpoint_every: int = 0  # also always at the end of a finished run
    resume: str | None = None  # a checkpoint directory (or a run directory: its newest checkpoint)
    allow_list: frozenset[bytes] | None = None  # permissioned swarm: the only protocol ids taken into account
    eval_every: int = 0  # evaluate x^t every this many steps (in a background thread); 0 = never
    eval_final: bool = False  # evaluate the final parameters on the whole test set
    eval_examples: int | None = 1000
    join_timeout: float = 120.0  # how long to wait for the genesis / for min_peers
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    announce_maddrs: list[str] | None = None
    audit_parts: bool = False  # also log gradient/aggregate parts (~2·d floats per step) in the audit log
    # A peer that is not in the genesis joins the running swarm (see the module docstring); False: it stops.
    join: bool = True
    join_at_step: int | None = None  # stay out of the genesis; join once the run is at this step
    leave_at_step: int | None = None  # leave gracefully after this step (`SwarmPeer.leave` does it on demand)
    # Download x^t and the optimizer state from a member, check its hash against the majority of the step's
    # signed GRAD_COMMITs, save it as a checkpoint and stop (a verified snapshot, without joining).
    sync_only: bool = False
    crash_at: tuple[int, Phase] | None = None  # fault injection: SIGKILL itself on reaching (step, phase)

    def __post_init__(self) -> None:
        finite_timeout(self.phase_timeout)
        if self.min_peers < 1 or self.steps < 0 or self.validators < 0:
            raise ValueError("min_peers must be >= 1, steps and validators >= 0")
        if self.checkpoint_every < 0 or self.eval_every < 0:
            raise ValueError("checkpoint_every and eval_every must be >= 0")
        if self.sync_only and not self.initial_peers:
            raise ValueError("a late joiner (sync_only) needs initial_peers")

    @property
    def is_coordinator(self) -> bool:
        return not self.initial_peers

    def task_spec(self) -> str:
        """The task as the genesis names it: name and overrides (peers must build the very same task)."""
        return json.dumps([self.task, self.task_overrides], sort_keys=True, separators=(",", ":"))


@dataclass
class PeerOutcome:
    """How a peer's run ended. status: finished, synced (late joiner), banned, excluded, not-a-member or
    diverged (most members committed another H(x^t))."""

    status: str
    step: int
    params_hash: str
    reason: str = ""
    checkpoint: str | None = None
    accuracy: float | None = None


@dataclass(frozen=True)
class _Served:
    """The start state of our last finished step, with its signed commitments: what a joiner downloads."""

    step: int
    params: torch.Tensor
    optimizer: dict[str, torch.Tensor]
    r_prev: bytes
    members: tuple[bytes, ...]
    validators: tuple[tuple[bytes, bytes], ...]
    commits: tuple[bytes, ...]


class _AuditFilter:
    """The peer's audit callback: an `AuditLog` without the bulky gradient/aggregate parts (unless
    ``parts``). The log still verifies: evidence travels inside the accusations, and r^t needs only the MPRNG
    messages."""

    def __init__(self, log: AuditLog, parts: bool) -> None:
        self.log = log
        self.parts = parts

    def __call__(self, kind: str, obj: object) -> None:
        bulky = isinstance(obj, Signed) and obj.msg.kind in (Kind.GRAD_PART, Kind.AGG_PART)
        if not (kind == "msg" and bulky and not self.parts):
            self.log(kind, obj)


class SwarmPeer:
    """Runs one peer; ``await SwarmPeer(config).run()``. ``on_event(dict)`` receives progress events
    (listening, genesis, step, eval, done)."""

    def __init__(
        self,
        config: PeerRunConfig,
        *,
        task: Task | None = None,
        on_event: Callable[[dict], None] | None = None,
    ) -> None:
        self.cfg = config
        self.task = task or get_task(config.task, **config.task_overrides)
        self.run_dir = Path(config.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.identity = Identity.load_or_create(config.identity or self.run_dir / "identity.key")
        self.me = self.identity.peer_id
        self._on_event = on_event or (lambda ev: None)
        self._lock = threading.RLock()  # the task's model is not thread-safe: one computation at a time
        self._history: dict[int, tuple[torch.Tensor, bytes]] = {}  # step -> (x^t, r^{t-1}) for the oracle
        self._genesis: asyncio.Future[Genesis] | None = None
        self._genesis_raw: bytes | None = None
        self._boot_transport_id: bytes | None = None
        self._evals: set[asyncio.Task] = set()
        self._warmed_up = False
        self._served: _Served | None = None  # what a joiner gets: our last step's start state
        self._served_to: dict[bytes, int] = {}  # requester -> step last served (one answer per step each)
        self._waiting_joiners: set[bytes] = set()  # asked before we had finished a step
        self._state: asyncio.Future[State] | None = None
        self._joining = False
        self._welcomes: list[State] = []
        self._welcome_event = asyncio.Event()
        self._statuses: dict[bytes, int] = {}
        self._leave_requested = False
        # Only a joiner accepts a STATE, and only as large as its model and optimizer state (+ commits).
        self._max_state_bytes = 16 * self.task.dim + (1 << 20) if config.sync_only else 0
        self.gradient_attack: GradientAttack | None = None
        self.behaviour: Behaviour | None = None
        self._schedule = AttackSchedule(start=config.attack_start)
        self._slices = tuple(
            (o, o + int(torch.Size(s).numel()))
            for o, s in zip(self.task.layout.offsets, self.task.layout.shapes)
        )
        if config.attack:
            if resolve_attack(config.attack).kind == AttackKind.PROTOCOL:  # a Behaviour of the BtardPeer
                behaviour = get_attack(config.attack, start=config.attack_start, **config.attack_params)
                assert isinstance(behaviour, Behaviour)
                self.behaviour = behaviour
            else:  # it replaces the vector this peer sends (see `_work`)
                attack = get_attack(config.attack, **config.attack_params)
                assert isinstance(attack, GradientAttack)
                if attack.needs_honest_gradients:
                    raise ValueError(
                        f"attack {config.attack!r} needs every honest gradient (an omniscient attacker); "
                        "a real peer only has its own: run it in the simulator"
                    )
                self.gradient_attack = attack
        self.ckpt: Checkpoint | None = load_checkpoint(config.resume) if config.resume else None
        if self.ckpt is not None:
            self.params = self.ckpt.params.clone()
            self.opt = self.task.make_optimizer()
            self.opt.load_state_dict(self.ckpt.optimizer)
            if self.params.numel() != self.task.dim:
                raise ValueError(f"checkpoint has {self.params.numel()} parameters, task {self.task.dim}")
        else:
            self.params = self.task.initial_params()
            self.opt = self.task.make_optimizer()
        self.peer: BtardPeer | None = None
        self.driver: ProtocolDriver | None = None

    def leave(self) -> None:
        """Leave the run gracefully: the step that begins next is this peer's last (it announces a LEAVE in it,
        completes it, saves a checkpoint and stops with status ``left``). Call it on the peer's event loop."""
        self._leave_requested = True

    # ------------------------------------------------------------------ events and files
    def _emit(self, event: str, **fields: object) -> None:
        self._on_event({"event": event, "peer": short_id(self.me), **fields})

    # ------------------------------------------------------------------ the run
    async def run(self) -> PeerOutcome:
        from btard.transport.p2p import P2PConfig, P2PTransport  # imports hivemind: only when a peer runs

        if not self._warmed_up:
            await asyncio.to_thread(self.warm_up)
        transport = await P2PTransport.create(
            P2PConfig(
                initial_peers=list(self.cfg.initial_peers),
                host_maddrs=list(self.cfg.host_maddrs),
                announce_maddrs=self.cfg.announce_maddrs,
            ),
            protocol_id=self.me,
            sign=self.identity.sign,
        )
        # A resumed run appends to its metrics and starts a new audit log (each log verifies on its own).
        metrics = open(self.run_dir / "metrics.jsonl", "a" if self.ckpt else "w")  # noqa: SIM115 - closed below
        audit_log: AuditLog | None = None
        self.driver = ProtocolDriver(transport, on_other=self._on_control, on_phase=self._on_phase)
        try:
            self.driver.start()
            if not self.cfg.sync_only and self.cfg.join_at_step is None:  # joiners stay out of the genesis
                await transport.announce(self.cfg.run_name)
            self._emit(
                "listening",
                protocol_id=self.me.hex(),
                maddrs=await transport.get_visible_maddrs(),
                daemon_pid=transport.daemon_pid,
                client_socket=_client_socket(transport),
                coordinator=self.cfg.is_coordinator,
            )
            if self.cfg.sync_only:
                return await self._sync(transport)
            genesis = await (
                self._coordinate(transport) if self.cfg.is_coordinator else self._follow(transport)
            )
            if self.me not in genesis.members and not self.cfg.join:
                return self._outcome("not-a-member", "the run started without this peer (joining is off)")
            name = f"audit-from-step-{genesis.step}.jsonl" if self.ckpt else "audit.jsonl"
            audit_log = AuditLog(self.identity, path=self.run_dir / name)
            if self.me not in genesis.members:
                return await self._join(transport, genesis, audit_log, metrics)
            self.peer = self._protocol_peer(
                genesis.protocol_config(),
                genesis.members,
                audit_log=audit_log,
                start_step=genesis.step,
                r_prev=genesis.r_prev,
                validators=dict(genesis.validators),
            )
            self._emit(
                "genesis",
                step=genesis.step,
                members=[m.hex() for m in genesis.members],
                run_id=genesis.run_id.hex(),
                phase_timeout=genesis.phase_timeout,
                coordinator=short_id(genesis.coordinator),
            )
            self.driver.attach(self.peer)
            for m in genesis.members:
                if m != self.me:
                    self.driver.send(m, PING)
            await asyncio.sleep(min(max(genesis.start_at - time.time(), 0.0), MAX_START_WAIT_S))
            return await self._train(metrics)
        finally:
            for t in self._evals:
                t.cancel()
            await asyncio.gather(*self._evals, return_exceptions=True)
            await self.driver.close()
            await transport.close()
            metrics.close()
            if audit_log is not None:
                audit_log.close()

    def warm_up(self) -> None:
        """Load the data and run the model once before joining, so the first step is not late (`run` does it
        if the caller did not)."""
        with self._lock:
            self.task.compute_gradient(self.params, digest("warm-up", self.me))
        self._warmed_up = True

    # ------------------------------------------------------------------ bootstrap
    def _allowed(self, pid: bytes) -> bool:
        return self.cfg.allow_list is None or pid in self.cfg.allow_list

    def _on_control(self, incoming: Incoming) -> None:
        if not is_control(incoming.payload):
            return
        try:
            msg = decode_control(incoming.payload, self._max_state_bytes)
        except ControlError:
            return
        if msg is None:
            return  # a PING: the transport's acknowledgement is the answer
        if isinstance(msg, StateRequest):
            self._serve_state(msg)
        elif isinstance(msg, State):
            if self._state is not None and not self._state.done():
                self._state.set_result(msg)
        elif isinstance(msg, Welcome):
            st = msg.state
            ok = st.server in st.members and st.server != self.me and self.me in st.observers
            if self._joining and ok and len(self._welcomes) < MAX_WELCOMES:
                self._welcomes.append(st)
                self._welcome_event.set()
        elif isinstance(msg, Status):
            if self._joining and msg.run_name == self.cfg.run_name and len(self._statuses) < 4096:
                self._statuses[msg.protocol_id] = msg.step
        elif isinstance(msg, Hello):
            if msg.run_name == self.cfg.run_name and self._allowed(msg.protocol_id):
                assert self.driver is not None
                if self._genesis_raw is not None:
                    self.driver.send(msg.protocol_id, self._genesis_raw)
                if self.peer is not None:
                    self.driver.send(
                        msg.protocol_id, encode_status(self.cfg.run_name, self.me, self.peer.step)
                    )
        elif (
            isinstance(msg, Genesis)
            and self._genesis is not None
            and not self._genesis.done()
            and incoming.sender == self._boot_transport_id
        ):
            self._genesis.set_result(msg)

    async def _coordinate(self, transport) -> Genesis:
        ckpt, cfg = self.ckpt, self.cfg
        deadline = time.monotonic() + cfg.join_timeout
        last = -1
        while True:
            present = sorted(
                r.protocol_id
                for r in await transport.list_peers(cfg.run_name)
                if self._allowed(r.protocol_id)
            )
            if ckpt is not None:
                ready = set(ckpt.members) <= set(present)
            else:
                ready = len(present) >= cfg.min_peers and self.me in present
            if ready:
                break
            if time.monotonic() > deadline:
                if ckpt is not None and self.me in present:
                    break  # resume with whoever came: the absent members are excluded by the first step
                raise TimeoutError(f"only {len(present)} of {cfg.min_peers} peers after {cfg.join_timeout} s")
            if len(present) != last:
                last = len(present)
                self._emit("waiting", present=len(present), needed=cfg.min_peers)
            await asyncio.sleep(LIST_INTERVAL_S)
        if ckpt is not None:
            g = Genesis(
                coordinator=self.me,
                run_name=cfg.run_name,
                run_id=ckpt.run_id,
                task=cfg.task_spec(),
                dim=self.task.dim,
                step=ckpt.step,
                r_prev=ckpt.r_prev,
                params_hash=ckpt.params_hash,
                members=ckpt.members,
                validators=tuple(sorted(ckpt.validators.items())),
                phase_timeout=ckpt.phase_timeout,
                num_validators=ckpt.num_validators,
                start_at=time.time() + START_DELAY_S,
            )
        else:
            g = Genesis(
                coordinator=self.me,
                run_name=cfg.run_name,
                run_id=digest("swarm-run", self.me, cfg.run_name, os.urandom(32))[:16],
                task=cfg.task_spec(),
                dim=self.task.dim,
                step=0,
                r_prev=GENESIS,
                params_hash=params_digest(self.params),
                members=tuple(present),
                validators=(),
                phase_timeout=float(cfg.phase_timeout),
                num_validators=cfg.validators,
                start_at=time.time() + START_DELAY_S,
            )
        self._genesis_raw = encode_genesis(g, self.identity)
        assert self.driver is not None
        for m in g.members:
            if m != self.me:
                self.driver.send(m, self._genesis_raw)
        return g

    async def _follow(self, transport) -> Genesis:
        from hivemind.p2p import PeerID

        cfg = self.cfg
        self._boot_transport_id = PeerID.from_base58(cfg.initial_peers[0].rsplit("/p2p/", 1)[-1]).to_bytes()
        self._genesis = asyncio.get_running_loop().create_future()
        deadline = time.monotonic() + cfg.join_timeout
        coordinator: bytes | None = None
        while not self._genesis.done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no genesis from the coordinator within {cfg.join_timeout} s")
            if coordinator is None:
                for r in await transport.list_peers(cfg.run_name):
                    if r.transport_id == self._boot_transport_id:
                        coordinator = r.protocol_id
            if coordinator is not None:
                assert self.driver is not None
                self.driver.send(coordinator, encode_hello(cfg.run_name, self.me))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._genesis), HELLO_INTERVAL_S)
        g = self._genesis.result()
        self._check_genesis(g)
        return g

    def _check_genesis(self, g: Genesis) -> None:
        cfg, ckpt = self.cfg, self.ckpt
        problems = []
        if g.run_name != cfg.run_name:
            problems.append(f"run name {g.run_name!r}")
        if g.task != cfg.task_spec() or g.dim != self.task.dim:
            problems.append(
                f"task {g.task} (d={g.dim}), this peer runs {cfg.task_spec()} (d={self.task.dim})"
            )
        if cfg.allow_list is not None and not {g.coordinator, *g.members} <= cfg.allow_list:
            problems.append("members or coordinator outside the allow-list")
        if self.me in g.members and g.params_hash != params_digest(self.params):
            problems.append(f"H(x^{g.step}) differs from this peer's parameters")
        if ckpt is not None and self.me in g.members:
            mine = (ckpt.run_id, ckpt.step, ckpt.r_prev, ckpt.members, tuple(sorted(ckpt.validators.items())))
            if mine != (g.run_id, g.step, g.r_prev, g.members, g.validators):
                problems.append("run state differs from this peer's checkpoint")
        elif ckpt is None and g.step != 0 and self.me in g.members:
            problems.append(f"the run resumes at step {g.step}: pass --resume with its checkpoint")
        if problems:
            raise ValueError("refusing the genesis: " + "; ".join(problems))

    # ------------------------------------------------------------------ gradients and the oracle
    def _oracle(self, step: int, pid: bytes) -> torch.Tensor:
        params, r_prev = self._history[step]
        with self._lock:
            return self.task.compute_gradient(params, self.task.batch_seed(r_prev, step, pid))

    def _work(
        self, params: torch.Tensor, r_prev: bytes, step: int, contributor: bool, n: int
    ) -> tuple[float, torch.Tensor | None]:
        """(loss on this peer's batch, the vector it sends: its gradient, or an attack's; None as validator)."""
        task = self.task
        seed = task.batch_seed(r_prev, step, self.me)
        with self._lock, torch.no_grad():
            x, y = task.sample_batch(seed)
            model = task.model_with_params(params)
            loss = float(task.loss_fn(model(x.to(params.dtype) if x.is_floating_point() else x), y))
        if not contributor:
            return loss, None
        with self._lock:
            g = task.compute_gradient(params, seed)
            attack = self.gradient_attack
            if attack is not None:

                def recompute(label_flip: bool = False) -> torch.Tensor:
                    return task.compute_gradient(params, seed, label_flip=label_flip)

                ctx = AttackContext(
                    step=step,
                    peer_index=0,
                    peer_id=self.me,
                    byzantine_ids=(),
                    own_gradient=g,
                    n=max(n, 1),
                    b=1,
                    seed=self.cfg.attack_seed,
                    compute_gradient=recompute,
                    param_slices=self._slices,
                )
                attack.observe(ctx)
                if self._schedule.active(step, 0):
                    g = apply_attack(attack, ctx)
        return loss, g

    def _on_phase(self, step: int, phase: Phase) -> None:
        crash = self.cfg.crash_at
        if crash is not None and (step > crash[0] or (step == crash[0] and phase >= crash[1])):
            self._emit("crash", step=step, phase=phase.name)
            os.kill(os.getpid(), signal.SIGKILL)  # a real kill -9: no cleanup, nothing more is sent

    # ------------------------------------------------------------------ training
    async def _train(self, metrics) -> PeerOutcome:
        peer, driver, cfg = self.peer, self.driver, self.cfg
        assert peer is not None and driver is not None
        status, reason = "finished", ""
        while peer.step < cfg.steps:
            t = peer.step
            self._history[t] = (self.params, peer.r_prev)
            for old in [s for s in self._history if s < t - 1]:
                del self._history[old]
            start = time.monotonic()
            if self._leave_requested or (cfg.leave_at_step is not None and t >= cfg.leave_at_step):
                peer.leave()
            contributor = not peer.is_validator and not peer.is_observer
            loss, grad = await asyncio.to_thread(
                self._work, self.params, peer.r_prev, t, contributor, len(peer.contributors)
            )
            grad_s = time.monotonic() - start
            opt_state = self.opt.state_dict()  # a copy: hashed now, served to joiners after the step
            x_hash = training_state_digest(self.params, opt_state)
            step_timeout = peer.phase_timeout
            role = (
                "validator"
                if peer.is_validator
                else "probation"
                if peer.on_probation(self.me)
                else "contributor"
            )
            r_prev, validators = peer.r_prev, tuple(sorted(peer.validators.items()))
            result, timing = await driver.run_step(x_hash, grad)
            disagree = _commit_disagreement(peer, x_hash)
            commits = tuple(s.raw for s in _grad_commits(peer))
            self._served = _Served(t, self.params, opt_state, r_prev, result.members, validators, commits)
            for joiner in self._waiting_joiners:
                self._serve_state(StateRequest(cfg.run_name, joiner))
            self._waiting_joiners.clear()
            record = _step_record(result, timing, loss, role, grad_s, time.monotonic() - start, disagree)
            record["params_hash"] = params_digest(self.params).hex()
            record["state_hash"] = x_hash.hex()
            record["phase_timeout"] = step_timeout
            self.params = self.opt.step(self.params, result.aggregate, t)
            self._welcome_joiners(result)
            self._log_step(metrics, record)
            driver.forget(set(result.members) - set(result.next_members))
            if result.partitioned:
                status, reason = "partitioned", "lost contact with at least half of the members in one step"
                break
            if self.me in result.left:
                status, reason = "left", f"left gracefully after step {t}"
                break
            if self.me not in result.next_members:
                mine = [v for v in result.verdicts if v.banned == self.me]
                status = "banned" if mine else "excluded"
                reason = mine[0].reason if mine else "silent or late in this step"
                break
            if 2 * len(disagree) > len(result.members):
                status, reason = "diverged", "most members committed a different H(x^t)"
                break
            if cfg.checkpoint_every and peer.step % cfg.checkpoint_every == 0 and peer.step < cfg.steps:
                save_checkpoint(self._checkpoint(), self.run_dir / "checkpoints")
            if cfg.eval_every and peer.step % cfg.eval_every == 0:
                task = asyncio.create_task(self._evaluate(self.params, peer.step, cfg.eval_examples))
                self._evals.add(task)
                task.add_done_callback(self._evals.discard)
        ckpt_dir = None
        if status in ("finished", "left"):
            ckpt_dir = str(save_checkpoint(self._checkpoint(), self.run_dir / "checkpoints"))
        accuracy = None
        if status == "finished" and cfg.eval_final:
            accuracy = (await self._evaluate(self.params, peer.step, None))["accuracy"]
        return self._outcome(status, reason, ckpt_dir, accuracy)

    def _log_step(self, metrics, record: dict) -> None:
        """One metrics line and one progress event per step."""
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        self._emit("step", **record)

    def _protocol_peer(
        self, config: ProtocolConfig, members: tuple[bytes, ...], *, audit_log: AuditLog, **start
    ) -> BtardPeer:
        """This process's `BtardPeer`: its identity, oracle, attack behaviour, audit log and admission policy
        (the allow-list also bounds who may JOIN); ``start`` says where in the run it begins."""
        return BtardPeer(
            self.identity,
            config,
            members,
            oracle=self._oracle,
            behaviour=self.behaviour,
            audit=_AuditFilter(audit_log, self.cfg.audit_parts),
            admit=self._allowed,
            **start,
        )

    # ------------------------------------------------------------------ late joiners
    def _welcome_joiners(self, result: StepResult) -> None:
        """After step t (x^{t+1} applied): send each joiner admitted in it our state, if r^t drew us."""
        peer, driver = self.peer, self.driver
        assert peer is not None and driver is not None
        for joiner in result.joined:
            survivors = [p for p in result.next_members if p not in result.joined]
            servers = sorted(survivors, key=lambda p: digest("welcome", result.r, joiner, p))[
                :WELCOME_SERVERS
            ]
            if self.me not in servers:
                continue
            opt = sorted(self.opt.state_dict().items())
            state = State(
                server=self.me,
                run_id=peer.cfg.run_id,
                step=result.step + 1,
                r_prev=result.r,
                members=result.next_members,
                validators=tuple(sorted(result.next_validators.items())),
                params=self.params.numpy().tobytes(),
                optimizer=_wire_optimizer(opt),
                commits=(),
                phase_timeout=peer.phase_timeout,
                num_validators=peer.cfg.validators,
                observers=result.joined,
                probation=tuple(sorted(result.probation.items())),
            )
            driver.send(joiner, encode_state(state, self.identity, ControlKind.WELCOME))
            self._emit("welcomed", joiner=short_id(joiner), step=result.step + 1)

    async def _join(self, transport, genesis: Genesis, audit_log: AuditLog, metrics) -> PeerOutcome:
        """Join the running swarm (module docstring): JOIN until admitted, observe the first step with the
        WELCOME state, keep the WELCOME that the majority's commits back, then train like every member."""
        cfg, driver = self.cfg, self.driver
        assert driver is not None
        self._joining = True
        self._max_state_bytes = 16 * self.task.dim + (1 << 20)
        pcfg = genesis.protocol_config()
        deadline = time.monotonic() + cfg.join_timeout
        self._emit("joining", run_id=pcfg.run_id.hex())
        while not self._welcomes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"not admitted within {cfg.join_timeout} s")
            records = [r for r in await transport.list_peers(cfg.run_name) if r.protocol_id != self.me]
            for r in records:
                if self._allowed(r.protocol_id):
                    driver.send(r.protocol_id, encode_hello(cfg.run_name, self.me))
            await asyncio.sleep(0.2)  # STATUS answers
            steps = sorted(self._statuses.values())
            if steps and steps[len(steps) // 2] >= (cfg.join_at_step or 0):
                step = steps[len(steps) // 2]  # the median: a few lying members cannot move it far
                join = encode(Join(pcfg.run_id, step, self.me), self.identity).raw
                for r in records:
                    if self._allowed(r.protocol_id):
                        driver.send(r.protocol_id, join)
            self._welcome_event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._welcome_event.wait(), JOIN_RESEND_S)
        self._joining = False
        w = self._welcomes[0]
        if w.run_id != pcfg.run_id or self.me not in w.members:
            raise ValueError("the WELCOME does not belong to this run or does not list this peer")
        self.peer = self._protocol_peer(
            pcfg,
            w.members,
            audit_log=audit_log,
            start_step=w.step,
            r_prev=w.r_prev,
            validators=dict(w.validators),
            observers=w.observers,
            probation=dict(w.probation),
            phase_timeout=w.phase_timeout,
        )
        driver.attach(self.peer)
        self._emit("admitted", step=w.step, members=len(w.members), server=short_id(w.server))
        start = time.monotonic()
        result, timing = await driver.run_step(b"\0" * 32, None)  # observer: commits nothing
        chosen = None
        committed = [s.msg for s in _grad_commits(self.peer)]
        for cand in list(self._welcomes):
            try:
                params, opt = self._load_state(cand)
            except ValueError:
                continue
            h = training_state_digest(params, opt.state_dict())
            backers = [m.sender for m in committed if m.params_hash == h]
            if 2 * len(backers) > len(committed):
                chosen = (cand, params, opt, len(backers), len(committed))
                break
        if chosen is None:
            return self._outcome("state-rejected", "no WELCOME state matches the majority's commitments")
        cand, self.params, self.opt, nb, nc = chosen
        self._history[w.step] = (self.params, w.r_prev)
        record = _step_record(result, timing, 0.0, "observer", 0.0, time.monotonic() - start, [])
        record["params_hash"] = params_digest(self.params).hex()
        record["state_backers"] = f"{nb}/{nc}"
        self.params = self.opt.step(self.params, result.aggregate, w.step)
        self._log_step(metrics, record)
        if result.partitioned or self.me not in result.next_members:
            return self._outcome("excluded", "left out at the end of its observer step")
        outcome = await self._train(metrics)
        return outcome

    def _load_state(self, st: State) -> tuple[torch.Tensor, FlatOptimizer]:
        """The parameters and an optimizer loaded from a STATE or WELCOME; ValueError if they do not fit."""
        if len(st.params) != 4 * self.task.dim:
            raise ValueError(f"state has {len(st.params) // 4} parameters, the task {self.task.dim}")
        params = torch.frombuffer(bytearray(st.params), dtype=torch.float32)
        optimizer = {
            k: torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(shape)
            for k, shape, raw in st.optimizer
        }
        opt = self.task.make_optimizer()
        opt.load_state_dict(optimizer)  # raises ValueError if it does not fit the task
        return params, opt

    def _serve_state(self, req: StateRequest) -> None:
        """Send our last step's state to a joiner (after our first step if we have none yet)."""
        if req.run_name != self.cfg.run_name or not self._allowed(req.protocol_id):
            return
        served, peer = self._served, self.peer
        if served is None or peer is None:
            if len(self._waiting_joiners) < MAX_WAITING_JOINERS:
                self._waiting_joiners.add(req.protocol_id)
            return
        if self._served_to.get(req.protocol_id) == served.step:
            return  # answered for this step already: a requester cannot make us send the model in a loop
        self._served_to[req.protocol_id] = served.step
        opt = sorted(served.optimizer.items())
        state = State(
            server=self.me,
            run_id=peer.cfg.run_id,
            step=served.step,
            r_prev=served.r_prev,
            members=served.members,
            validators=served.validators,
            params=served.params.numpy().tobytes(),
            optimizer=_wire_optimizer(opt),
            commits=served.commits,
            phase_timeout=peer.cfg.phase_timeout,
            num_validators=peer.cfg.validators,
        )
        assert self.driver is not None
        self.driver.send(req.protocol_id, encode_state(state, self.identity))

    async def _sync(self, transport) -> PeerOutcome:
        """Late joiner: ask members (the bootstrap peer first) for their state until one verifies."""
        from hivemind.p2p import PeerID

        cfg, driver = self.cfg, self.driver
        assert driver is not None
        boot = PeerID.from_base58(cfg.initial_peers[0].rsplit("/p2p/", 1)[-1]).to_bytes()
        deadline = time.monotonic() + cfg.join_timeout
        while time.monotonic() < deadline:
            records = await transport.list_peers(cfg.run_name)
            for r in sorted(records, key=lambda r: (r.transport_id != boot, r.protocol_id)):
                if not self._allowed(r.protocol_id):
                    continue
                self._state = asyncio.get_running_loop().create_future()
                driver.send(r.protocol_id, encode_state_request(cfg.run_name, self.me))
                try:
                    state = await asyncio.wait_for(self._state, SYNC_REPLY_S)
                    ckpt, backers = self._accept_state(state)
                except TimeoutError:
                    continue
                except (ControlError, ValueError) as e:
                    self._emit("state-rejected", server=short_id(r.protocol_id), reason=str(e))
                    continue
                self.params, self.opt = ckpt.params, self.task.make_optimizer()
                self.opt.load_state_dict(ckpt.optimizer)
                path = save_checkpoint(ckpt, self.run_dir / "checkpoints")
                n = len(ckpt.members)
                reason = (
                    f"x^{ckpt.step} from {short_id(state.server)}, committed by {len(backers)} of {n} members"
                )
                self.ckpt = ckpt
                return self._outcome("synced", reason, str(path))
            await asyncio.sleep(HELLO_INTERVAL_S)  # nobody has finished a step yet
        raise TimeoutError(f"no member served a verifiable state within {cfg.join_timeout} s")

    def _accept_state(self, state: State) -> tuple[Checkpoint, list[bytes]]:
        params, opt = self._load_state(state)
        optimizer = opt.state_dict()
        backers = verify_state(state, training_state_digest(params, optimizer))
        ckpt = Checkpoint(
            step=state.step,
            params=params,
            optimizer=optimizer,
            r_prev=state.r_prev,
            members=state.members,
            validators=dict(state.validators),
            run_id=state.run_id,
            run_name=self.cfg.run_name,
            task=self.cfg.task_spec(),
            phase_timeout=state.phase_timeout,
            num_validators=state.num_validators,
        )
        return ckpt, backers

    def _checkpoint(self) -> Checkpoint:
        peer = self.peer
        assert peer is not None
        return Checkpoint(
            step=peer.step,
            params=self.params,
            optimizer=self.opt.state_dict(),
            r_prev=peer.r_prev,
            members=peer.members,
            validators=dict(peer.validators),
            run_id=peer.cfg.run_id,
            run_name=self.cfg.run_name,
            task=self.cfg.task_spec(),
            phase_timeout=peer.cfg.phase_timeout,
            num_validators=peer.cfg.validators,
        )

    async def _evaluate(self, params: torch.Tensor, step: int, examples: int | None) -> dict:
        def run() -> dict:
            with self._lock:
                return self.task.evaluate(params, examples)

        res = await asyncio.to_thread(run)
        self._emit(
            "eval", step=step, accuracy=res["accuracy"], loss=res["loss"], examples=int(res["examples"])
        )
        return res

    def _outcome(
        self, status: str, reason: str = "", ckpt: str | None = None, accuracy: float | None = None
    ) -> PeerOutcome:
        step = self.peer.step if self.peer is not None else (self.ckpt.step if self.ckpt else 0)
        out = PeerOutcome(status, step, params_digest(self.params).hex(), reason, ckpt, accuracy)
        self._emit("done", **asdict(out))
        return out


def _wire_optimizer(items: list[tuple[str, torch.Tensor]]) -> tuple[tuple[str, tuple[int, ...], bytes], ...]:
    """Optimizer state as (key, shape, raw float32) for STATE/WELCOME. Integer entries (Adam's step count) are
    sent as float32, exact below 2**24, and the optimizer's `load_state_dict` reads them back with int()."""
    out = []
    for k, v in items:
        f = v.detach().to(torch.float32)
        if not v.is_floating_point() and not torch.equal(f.to(v.dtype), v):
            raise ValueError(f"optimizer entry {k!r} is not exact in float32")
        out.append((k, tuple(v.shape), f.contiguous().numpy().tobytes()))
    return tuple(out)


def _grad_commits(peer: BtardPeer) -> list[Signed]:
    """The signed GRAD_COMMITs of the step the peer just finished."""
    return [s for (kind, _, _), s in peer.slots.items() if kind == Kind.GRAD_COMMIT]


def _commit_disagreement(peer: BtardPeer, x_hash: bytes) -> list[str]:
    """Members whose GRAD_COMMIT of the step just finished carried another H(x^t) than ours."""
    return sorted(short_id(s.msg.sender) for s in _grad_commits(peer) if s.msg.params_hash != x_hash)


def _step_record(
    res: StepResult,
    timing: StepTiming,
    loss: float,
    role: str,
    grad_s: float,
    step_s: float,
    disagree: list[str],
) -> dict:
    return {
        "step": res.step,
        "loss": loss,
        "role": role,
        "active": len(res.members),
        "next_active": len(res.next_members),
        "step_seconds": round(step_s, 4),
        "gradient_seconds": round(grad_s, 4),
        "protocol_seconds": round(timing.total, 4),
        "phases": timing.durations(),
        "deadlines_hit": timing.deadlines,
        "bans": [
            {
                "peer": short_id(v.banned),
                "peer_id": v.banned.hex(),
                "code": v.code.value,
                "reason": v.reason,
                "accuser": short_id(v.accuser) if v.accuser else None,
            }
            for v in res.verdicts
        ],
        "excluded": [short_id(p) for p in res.excluded],
        "joined": [short_id(p) for p in res.joined],
        "left": [short_id(p) for p in res.left],
        "params_disagree": disagree,
        "missing_parts": list(res.missing_parts),
        "failed_parts": list(res.failed_parts),
        "clip_iterations": res.clip_iterations,
        "rejected_messages": res.rejected_messages,
        "r": res.r.hex(),
    }


def _client_socket(transport) -> str | None:
    """hivemind's unix socket file for incoming streams (a crash leaves it behind; the launcher removes it)."""
    with contextlib.suppress(Exception):
        return str(transport._p2p._client_listen_maddr["unix"])
    return None
