"""Swarm control messages: what peers exchange outside the BTARD step (bootstrap of a run).

They travel over the same transport as protocol messages; the 4-byte magic tells them apart (protocol
messages start with ``BTRD``). Wire format: ``b"BTSW" | kind u8 | msgpack body``. Bodies are decoded with
every length bounded and no extension types; nothing is ever unpickled.

- HELLO ``[run_name, protocol_id]``: "I am here, send me the genesis" (unsigned: the answer is public).
- GENESIS ``[body, signature]``: the coordinator's signed start state of a run (members, step, r, H(x), the
  protocol settings every peer must share). See :class:`Genesis`.
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
MAX_NAME_CHARS = 256  # run and task names (a task may be "package.module:factory")
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


@dataclass(frozen=True)
class Hello:
    run_name: str
    protocol_id: bytes


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
        ]


def is_control(payload: bytes) -> bool:
    return payload[:4] == CONTROL_MAGIC


def encode_hello(run_name: str, protocol_id: bytes) -> bytes:
    return CONTROL_MAGIC + bytes([ControlKind.HELLO]) + msgpack.packb([run_name, protocol_id])


def encode_genesis(genesis: Genesis, identity: Identity) -> bytes:
    if identity.peer_id != genesis.coordinator:
        raise ValueError("the genesis must be signed by its coordinator")
    body = msgpack.packb(genesis._fields(), use_bin_type=True)
    sig = identity.sign(digest("swarm-genesis", body))
    return CONTROL_MAGIC + bytes([ControlKind.GENESIS]) + msgpack.packb([body, sig], use_bin_type=True)


def decode_control(payload: bytes) -> Hello | Genesis:
    """Parse and verify a control message; raises :class:`ControlError`."""
    if not is_control(payload) or len(payload) < 5:
        raise ControlError("not a control message")
    if len(payload) > MAX_CONTROL_BYTES:
        raise ControlError(f"control message of {len(payload)} bytes exceeds {MAX_CONTROL_BYTES}")
    kind, body = payload[4], payload[5:]
    if kind == ControlKind.HELLO:
        f = _unpack(body)
        if not isinstance(f, list) or len(f) != 2:
            raise ControlError("HELLO must be [run_name, protocol_id]")
        return Hello(_str(f[0], "run_name"), _bin(f[1], PEER_ID_BYTES, "protocol_id"))
    if kind == ControlKind.GENESIS:
        outer = _unpack(body)
        if not isinstance(outer, list) or len(outer) != 2:
            raise ControlError("GENESIS must be [body, signature]")
        raw, sig = _bin(outer[0], None, "body"), _bin(outer[1], SIGNATURE_BYTES, "signature")
        return _parse_genesis(raw, sig)
    raise ControlError(f"unknown control kind {kind}")


def _parse_genesis(raw: bytes, sig: bytes) -> Genesis:
    f = _unpack(raw)
    if not isinstance(f, list) or len(f) != 13 or f[0] != GENESIS_VERSION:
        raise ControlError("unsupported genesis format")
    coordinator = _bin(f[1], PEER_ID_BYTES, "coordinator")
    if not verify(coordinator, digest("swarm-genesis", raw), sig):
        raise ControlError("genesis signature does not verify")
    members = _list(f[9], "members")
    pairs = _list(f[10], "validators")
    timeout = f[11]
    if not isinstance(timeout, float) or not MIN_PHASE_TIMEOUT <= timeout <= MAX_PHASE_TIMEOUT:
        raise ControlError(f"phase timeout must be a float in [{MIN_PHASE_TIMEOUT}, {MAX_PHASE_TIMEOUT}]")
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
    )
    if len(set(g.members)) != len(g.members) or not g.members or g.dim < 1:
        raise ControlError("genesis members must be distinct and non-empty, dim positive")
    if any(v not in g.members or t not in g.members for v, t in g.validators):
        raise ControlError("genesis validators must be members")
    return g


def _unpack(data: bytes) -> object:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_CONTROL_BYTES,
            max_bin_len=MAX_CONTROL_BYTES,
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
