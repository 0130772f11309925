"""Swarm control messages: what peers exchange outside the BTARD step (bootstrap of a run).

They travel over the same transport as protocol messages; the 4-byte magic tells them apart (protocol
messages start with ``BTRD``). Wire format: ``b"BTSW" | kind u8 | msgpack body``. Bodies are decoded with
every length bounded and no extension types; nothing is ever unpickled.

- HELLO ``[run_name, protocol_id]``: "I am here, send me the genesis" (unsigned: the answer is public).
- GENESIS ``[body, signature]``: the coordinator's signed start state of a run (members, step, r, H(x), the
  protocol settings every peer must share, when to begin). See :class:`Genesis`.
- PING ``[]``: opens the connection to a member before the first step (the answer is the transport's ack).
- STATE_REQUEST ``[run_name, protocol_id]`` and STATE ``[body, signature]``: a late joiner asks a member for
  x^t, the optimizer state and the signed GRAD_COMMITs of step t; it trusts x^t only if a majority of the
  step's members committed H(x^t, optimizer state) (see :func:`verify_state`).
- STATUS ``[run_name, protocol_id, step]``: a member's answer to HELLO once the run is going (the step it is
  in), so a joiner can name a current step in its JOIN. Unsigned and advisory: a wrong step only gets that
  JOIN refused as stale.
- WELCOME ``[body, signature]``: a STATE sent unasked to a peer admitted at the end of step t: x^{t+1}, the
  optimizer state, the members, validators, observers and probation of step t+1. The joiner checks it against
  the GRAD_COMMITs of step t+1, which it receives itself as an observer of that step.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import msgpack

from btard.crypto import PEER_ID_BYTES, SIGNATURE_BYTES, Identity, digest, verify
from btard.protocol.messages import Limits
from btard.protocol.peer import ProtocolConfig

CONTROL_MAGIC = b"BTSW"
GENESIS_VERSION = 1
MAX_NAME_CHARS = 1024  # run and task names (a task is "package.module:factory" and its JSON overrides)
# A genesis lists at most Limits().max_peers members plus as many validator pairs: ~100 KB at 1024 peers.
MAX_CONTROL_BYTES = 64 * Limits().max_peers * 3 + 4096
# The coordinator picks the phase timeout for everyone; outside these bounds the run cannot work (below:
# loopback latency; above: a single crash would stall the swarm for hours).
MIN_PHASE_TIMEOUT, MAX_PHASE_TIMEOUT = 0.05, 600.0


class ControlError(ValueError):
    """A control message is malformed, badly signed or out of bounds."""


class ControlKind(enum.IntEnum):
    HELLO = 1
    GENESIS = 2
    PING = 3
    STATE_REQUEST = 4
    STATE = 5
    STATUS = 6
    WELCOME = 7


@dataclass(frozen=True)
class Hello:
    run_name: str
    protocol_id: bytes


@dataclass(frozen=True)
class StateRequest:
    run_name: str
    protocol_id: bytes


@dataclass(frozen=True)
class Status:
    run_name: str
    protocol_id: bytes
    step: int


@dataclass(frozen=True)
class State:
    """A member's training state at the start of step ``step``, with the step's signed GRAD_COMMITs."""

    server: bytes
    run_id: bytes
    step: int
    r_prev: bytes
    members: tuple[bytes, ...]
    validators: tuple[tuple[bytes, bytes], ...]
    params: bytes  # x^step as raw little-endian float32
    optimizer: tuple[tuple[str, tuple[int, ...], bytes], ...]  # (key, shape, raw float32) per state tensor
    commits: tuple[bytes, ...]  # raw signed GRAD_COMMIT messages of step `step`
    phase_timeout: float
    num_validators: int
    observers: tuple[bytes, ...] = ()  # WELCOME: the joiners admitted for step `step`
    probation: tuple[tuple[bytes, int], ...] = ()  # WELCOME: (peer, last step on probation)


@dataclass(frozen=True)
class Welcome:
    """The state an admitted joiner starts from (see the module docstring)."""

    state: State


@dataclass(frozen=True)
class Genesis:
    """The start state of a run, signed by its coordinator. Every peer of the run builds its `BtardPeer` from
    it, so they agree on the member list, the first step and the protocol settings.

    ``params_hash`` is H(x^step) (``params_digest``): followers check it against their own x^step (the task's
    initial parameters, or their checkpoint), so a peer with a different model or data refuses to start.
    """

    coordinator: bytes
    run_name: str
    run_id: bytes
    task: str
    dim: int
    step: int
    r_prev: bytes
    params_hash: bytes
    members: tuple[bytes, ...]
    validators: tuple[tuple[bytes, bytes], ...]  # (validator, target) pairs of the first step
    phase_timeout: float
    num_validators: int
    start_at: float  # Unix time at which every member begins the first step

    def protocol_config(self) -> ProtocolConfig:
        return ProtocolConfig(
            run_id=self.run_id,
            dim=self.dim,
            phase_timeout=self.phase_timeout,
            validators=self.num_validators,
        )

    def _fields(self) -> list:
        return [
            GENESIS_VERSION,
            self.coordinator,
            self.run_name,
            self.run_id,
            self.task,
            self.dim,
            self.step,
            self.r_prev,
            self.params_hash,
            list(self.members),
            [list(v) for v in self.validators],
            self.phase_timeout,
            self.num_validators,
            self.start_at,
        ]


def is_control(payload: bytes) -> bool:
    return payload[:4] == CONTROL_MAGIC


def encode_hello(run_name: str, protocol_id: bytes) -> bytes:
    return CONTROL_MAGIC + bytes([ControlKind.HELLO]) + msgpack.packb([run_name, protocol_id])


PING = CONTROL_MAGIC + bytes([ControlKind.PING]) + msgpack.packb([])


def encode_genesis(genesis: Genesis, identity: Identity) -> bytes:
    if identity.peer_id != genesis.coordinator:
        raise ValueError("the genesis must be signed by its coordinator")
    body = msgpack.packb(genesis._fields(), use_bin_type=True)
    sig = identity.sign(digest("swarm-genesis", body))
    return CONTROL_MAGIC + bytes([ControlKind.GENESIS]) + msgpack.packb([body, sig], use_bin_type=True)


def encode_state_request(run_name: str, protocol_id: bytes) -> bytes:
    return CONTROL_MAGIC + bytes([ControlKind.STATE_REQUEST]) + msgpack.packb([run_name, protocol_id])


def encode_status(run_name: str, protocol_id: bytes, step: int) -> bytes:
    return CONTROL_MAGIC + bytes([ControlKind.STATUS]) + msgpack.packb([run_name, protocol_id, step])


def encode_state(state: State, identity: Identity, kind: ControlKind = ControlKind.STATE) -> bytes:
    fields = [
        GENESIS_VERSION,
        state.server,
        state.run_id,
        state.step,
        state.r_prev,
        list(state.members),
        [list(v) for v in state.validators],
        state.params,
        [[k, list(shape), raw] for k, shape, raw in state.optimizer],
        list(state.commits),
        state.phase_timeout,
        state.num_validators,
        list(state.observers),
        [[p, s] for p, s in state.probation],
    ]
    if kind not in (ControlKind.STATE, ControlKind.WELCOME):
        raise ValueError("a state travels as STATE or WELCOME")
    body = msgpack.packb(fields, use_bin_type=True)
    sig = identity.sign(digest("swarm-state", int(kind), body))
    return CONTROL_MAGIC + bytes([kind]) + msgpack.packb([body, sig], use_bin_type=True)


def decode_control(
    payload: bytes, max_state_bytes: int = 0
) -> Hello | Genesis | StateRequest | State | Status | Welcome | None:
    """Parse and verify a control message (None for a PING); raises :class:`ControlError`.

    STATE messages carry the model: they are accepted up to ``max_state_bytes`` (0: refused), all other kinds
    up to ``MAX_CONTROL_BYTES``."""
    if not is_control(payload) or len(payload) < 5:
        raise ControlError("not a control message")
    kind, body = payload[4], payload[5:]
    limit = max_state_bytes if kind in (ControlKind.STATE, ControlKind.WELCOME) else MAX_CONTROL_BYTES
    if len(payload) > limit:
        raise ControlError(f"control message of {len(payload)} bytes exceeds {limit}")
    if kind in (ControlKind.HELLO, ControlKind.STATE_REQUEST):
        f = _unpack(body)
        if not isinstance(f, list) or len(f) != 2:
            raise ControlError("HELLO and STATE_REQUEST are [run_name, protocol_id]")
        cls = Hello if kind == ControlKind.HELLO else StateRequest
        return cls(_str(f[0], "run_name"), _bin(f[1], PEER_ID_BYTES, "protocol_id"))
    if kind == ControlKind.STATUS:
        f = _unpack(body)
        if not isinstance(f, list) or len(f) != 3:
            raise ControlError("STATUS is [run_name, protocol_id, step]")
        return Status(_str(f[0], "run_name"), _bin(f[1], PEER_ID_BYTES, "protocol_id"), _int(f[2], "step"))
    if kind in (ControlKind.STATE, ControlKind.WELCOME):
        outer = _unpack(body, limit)
        if not isinstance(outer, list) or len(outer) != 2:
            raise ControlError("STATE and WELCOME must be [body, signature]")
        raw, sig = _bin(outer[0], None, "body"), _bin(outer[1], SIGNATURE_BYTES, "signature")
        state = _parse_state(raw, sig, limit, kind)
        return Welcome(state) if kind == ControlKind.WELCOME else state
    if kind == ControlKind.GENESIS:
        outer = _unpack(body)
        if not isinstance(outer, list) or len(outer) != 2:
            raise ControlError("GENESIS must be [body, signature]")
        raw, sig = _bin(outer[0], None, "body"), _bin(outer[1], SIGNATURE_BYTES, "signature")
        return _parse_genesis(raw, sig)
    if kind == ControlKind.PING:
        return None
    raise ControlError(f"unknown control kind {kind}")


def _parse_genesis(raw: bytes, sig: bytes) -> Genesis:
    f = _unpack(raw)
    if not isinstance(f, list) or len(f) != 14 or f[0] != GENESIS_VERSION:
        raise ControlError("unsupported genesis format")
    coordinator = _bin(f[1], PEER_ID_BYTES, "coordinator")
    if not verify(coordinator, digest("swarm-genesis", raw), sig):
        raise ControlError("genesis signature does not verify")
    members = _list(f[9], "members")
    pairs = _list(f[10], "validators")
    timeout = _timeout(f[11])
    g = Genesis(
        coordinator=coordinator,
        run_name=_str(f[2], "run_name"),
        run_id=_bin(f[3], 16, "run_id"),
        task=_str(f[4], "task"),
        dim=_int(f[5], "dim"),
        step=_int(f[6], "step"),
        r_prev=_bin(f[7], 32, "r_prev"),
        params_hash=_bin(f[8], 32, "params_hash"),
        members=tuple(_bin(m, PEER_ID_BYTES, "member") for m in members),
        validators=tuple(_pair(p) for p in pairs),
        phase_timeout=timeout,
        num_validators=_int(f[12], "num_validators"),
        start_at=_time(f[13]),
    )
    if len(set(g.members)) != len(g.members) or not g.members or g.dim < 1:
        raise ControlError("genesis members must be distinct and non-empty, dim positive")
    if any(v not in g.members or t not in g.members for v, t in g.validators):
        raise ControlError("genesis validators must be members")
    return g


def _parse_state(raw: bytes, sig: bytes, limit: int, kind: ControlKind) -> State:
    f = _unpack(raw, limit)
    if not isinstance(f, list) or len(f) != 14 or f[0] != GENESIS_VERSION:
        raise ControlError("unsupported state format")
    server = _bin(f[1], PEER_ID_BYTES, "server")
    if not verify(server, digest("swarm-state", int(kind), raw), sig):
        raise ControlError("state signature does not verify")
    params = _bin(f[7], None, "params")
    opt = []
    for item in _list(f[8], "optimizer"):
        if not isinstance(item, list) or len(item) != 3 or not isinstance(item[1], list) or len(item[1]) > 8:
            raise ControlError("optimizer entries are [key, shape, bytes]")
        shape = tuple(_int(x, "shape") for x in item[1])
        data = _bin(item[2], None, "optimizer tensor")
        if len(data) != 4 * math.prod(shape):
            raise ControlError("optimizer tensor size does not match its shape")
        opt.append((_str(item[0], "key"), shape, data))
    if len(params) % 4:
        raise ControlError("params must be float32 bytes")
    return State(
        server=server,
        run_id=_bin(f[2], 16, "run_id"),
        step=_int(f[3], "step"),
        r_prev=_bin(f[4], 32, "r_prev"),
        members=tuple(_bin(m, PEER_ID_BYTES, "member") for m in _list(f[5], "members")),
        validators=tuple(_pair(p) for p in _list(f[6], "validators")),
        params=params,
        optimizer=tuple(opt),
        commits=tuple(_bin(c, None, "commit") for c in _list(f[9], "commits")),
        phase_timeout=_timeout(f[10]),
        num_validators=_int(f[11], "num_validators"),
        observers=tuple(_bin(m, PEER_ID_BYTES, "observer") for m in _list(f[12], "observers")),
        probation=tuple(_probation(p) for p in _list(f[13], "probation")),
    )


def _probation(v: object) -> tuple[bytes, int]:
    if not isinstance(v, list) or len(v) != 2:
        raise ControlError("probation entries are [peer id, step]")
    return _bin(v[0], PEER_ID_BYTES, "probation peer"), _int(v[1], "probation step")


def verify_state(state: State, params_hash: bytes, limits: Limits | None = None) -> list[bytes]:
    """The members whose valid signed GRAD_COMMIT of ``state.step`` carries ``params_hash`` (= H(x^t, optimizer
    state) of the received state, `btard.crypto.training_state_digest`). Raises :class:`ControlError` unless
    they are a strict majority of the members: with an honest majority, no coalition can make a joiner accept
    a state the honest peers do not hold."""
    from btard.protocol.errors import MalformedMessage
    from btard.protocol.messages import Kind, decode

    backers = set()
    for raw in state.commits:
        try:
            s = decode(raw, limits or Limits())
        except MalformedMessage:
            continue
        m = s.msg
        ok = m.kind == Kind.GRAD_COMMIT and m.run_id == state.run_id and m.step == state.step
        if ok and m.sender in state.members and m.params_hash == params_hash:
            backers.add(m.sender)
    if 2 * len(backers) <= len(state.members):
        raise ControlError(
            f"only {len(backers)} of {len(state.members)} members committed H(x^{state.step}) of this state"
        )
    return sorted(backers)


def _timeout(v: object) -> float:
    if not isinstance(v, float) or not MIN_PHASE_TIMEOUT <= v <= MAX_PHASE_TIMEOUT:
        raise ControlError(f"phase timeout must be a float in [{MIN_PHASE_TIMEOUT}, {MAX_PHASE_TIMEOUT}]")
    return v


def _time(v: object) -> float:
    if not isinstance(v, float) or not math.isfinite(v):
        raise ControlError("start_at: expected a finite float")
    return v


def _unpack(data: bytes, limit: int = MAX_CONTROL_BYTES) -> object:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_NAME_CHARS,
            max_bin_len=limit,
            max_array_len=Limits().max_peers + 16,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as e:  # msgpack raises many types on bad input
        raise ControlError(f"undecodable control message: {type(e).__name__}") from None


def _bin(v: object, n: int | None, what: str) -> bytes:
    if not isinstance(v, bytes) or (n is not None and len(v) != n):
        raise ControlError(f"{what}: expected {n or 'some'} bytes")
    return v


def _str(v: object, what: str) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= MAX_NAME_CHARS:
        raise ControlError(f"{what}: expected a non-empty string of at most {MAX_NAME_CHARS} characters")
    return v


def _int(v: object, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 62:
        raise ControlError(f"{what}: expected a non-negative int")
    return v


def _list(v: object, what: str) -> list:
    if not isinstance(v, list) or len(v) > Limits().max_peers:
        raise ControlError(f"{what}: expected a list of at most {Limits().max_peers} entries")
    return v


def _pair(v: object) -> tuple[bytes, bytes]:
    if not isinstance(v, list) or len(v) != 2:
        raise ControlError("validator entry must be [validator, target]")
    return _bin(v[0], PEER_ID_BYTES, "validator"), _bin(v[1], PEER_ID_BYTES, "target")


def finite_timeout(value: float) -> float:
    """``value`` as a float if it is a usable phase timeout, else ValueError (for CLI and config checks)."""
    value = float(value)
    if not math.isfinite(value) or not MIN_PHASE_TIMEOUT <= value <= MAX_PHASE_TIMEOUT:
        raise ValueError(
            f"phase timeout must be in [{MIN_PHASE_TIMEOUT}, {MAX_PHASE_TIMEOUT}] s, got {value}"
        )
    return value
