"""Protocol messages: frozen dataclasses with a canonical signed binary encoding.

Wire format (all integers little-endian)::

    magic "BTRD" | version u16 | kind u8 | run_id 16B | step u64 | sender 32B | body_len u32 | body | sig 64B

The body is msgpack (a fixed-length array of typed fields, tensors as raw float32 bytes), decoded with every
length bounded before allocation. The signature is Ed25519 over
``digest("msg", header, blake3(body))``, so any holder of the bytes can forward them and anyone can verify them.
Guarantees of :func:`decode`: it either returns a message whose signature verified, whose sizes are within
:class:`Limits` and whose fields have the documented types, or raises :class:`MalformedMessage`. It never
unpickles and never allocates more than ``limits.max_message_bytes``.
"""

from __future__ import annotations

import enum
import functools
import struct
from dataclasses import dataclass, field
from typing import ClassVar

import blake3
import msgpack
import numpy as np
import torch

from btard.crypto import (
    DIGEST_BYTES,
    PEER_ID_BYTES,
    SIGNATURE_BYTES,
    Identity,
    bytes_digest,
    digest,
    verify,
)
from btard.protocol.errors import MalformedMessage

PROTOCOL_VERSION = 1
MAGIC = b"BTRD"
RUN_ID_BYTES = 16
_HEADER = struct.Struct("<4sHB16sQ32sI")
HEADER_BYTES = _HEADER.size


@dataclass(frozen=True)
class Limits:
    """Size bounds checked before anything is allocated.

    Defaults: 1024 peers is far above any swarm BTARD targets (the paper runs 16); a part of 2^26 floats
    (256 MiB) covers a 1B-parameter model cut into 4 parts; 16 projections per part is twice our default.
    """

    max_peers: int = 1024
    max_part_elems: int = 1 << 26
    max_projections: int = 16
    max_evidence: int = 4
    max_digest_entries: int = 4096

    @property
    def max_message_bytes(self) -> int:
        return HEADER_BYTES + 4 * self.max_part_elems + 1024 + SIGNATURE_BYTES

    @property
    def max_evidence_bytes(self) -> int:
        return self.max_message_bytes


MAX_PHASE_HINT_MS = 3_600_000  # an hour: any larger phase time is nonsense


class Kind(enum.IntEnum):
    GRAD_COMMIT = 1
    GRAD_PART = 2
    AGG_COMMIT = 3
    AGG_PART = 4
    MPRNG_COMMIT = 5
    MPRNG_REVEAL = 6
    PROJ = 7
    ACCUSE = 8
    DIGEST = 9
    PULL = 10
    JOIN = 11
    LEAVE = 12


class Reason(enum.IntEnum):
    """Why an accusation is made; see protocol.md §7."""

    COMMIT_MISMATCH = 1
    EQUIVOCATION = 2
    NONFINITE = 3
    WRONG_PROJECTION = 4
    VALIDATION = 5
    MPRNG_MISMATCH = 6
    BAD_SHAPE = 7


@dataclass(frozen=True)
class Header:
    run_id: bytes
    step: int
    sender: bytes


@dataclass(frozen=True)
class Message:
    """Base of all messages. Subclasses define `kind` and their body fields."""

    kind: ClassVar[Kind]
    run_id: bytes
    step: int
    sender: bytes

    def body_fields(self) -> list:
        raise NotImplementedError

    def body_chunks(self) -> tuple[bytes, ...]:
        """The msgpack body, as chunks whose concatenation it is (see `_TensorMessage`)."""
        return (msgpack.packb(self.body_fields(), use_bin_type=True),)

    @classmethod
    def from_fields(cls, header: Header, fields: list, limits: Limits) -> Message:
        raise NotImplementedError

    def slot(self) -> tuple:
        """The (kind, sender, index) this message fills in its step: two different messages in one slot are
        an equivocation."""
        return (self.kind, self.sender, getattr(self, "part", 0))


def _bytes(v, n: int | None, what: str) -> bytes:
    if not isinstance(v, bytes):
        raise MalformedMessage("bad-field", f"{what}: expected bytes")
    if n is not None and len(v) != n:
        raise MalformedMessage("bad-field", f"{what}: expected {n} bytes, got {len(v)}")
    return v


def _int(v, lo: int, hi: int, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise MalformedMessage("bad-field", f"{what}: expected an int in [{lo}, {hi}]")
    return v


def _f32(v, max_elems: int, what: str) -> bytes:
    raw = _bytes(v, None, what)
    if len(raw) % 4 or len(raw) // 4 > max_elems:
        raise MalformedMessage(
            "bad-tensor", f"{what}: {len(raw)} bytes is not a float32 vector within limits"
        )
    return raw


@dataclass(frozen=True)
class GradCommit(Message):
    """Step 2: H(x^t) and the hashes of the sender's n gradient parts."""

    kind: ClassVar[Kind] = Kind.GRAD_COMMIT
    params_hash: bytes
    part_hashes: tuple[bytes, ...]

    def body_fields(self) -> list:
        return [self.params_hash, self.part_hashes]  # msgpack packs a tuple as the same array

    @classmethod
    def from_fields(cls, h: Header, f: list, limits: Limits) -> GradCommit:
        hashes = f[1]
        if not isinstance(hashes, list) or not 1 <= len(hashes) <= limits.max_peers:
            raise MalformedMessage("bad-field", "part_hashes: expected 1..max_peers digests")
        return cls(
            h.run_id,
            h.step,
            h.sender,
            _bytes(f[0], DIGEST_BYTES, "params_hash"),
            tuple(_bytes(x, DIGEST_BYTES, "part_hash") for x in hashes),
        )


@dataclass(frozen=True)
class _TensorMessage(Message):
    part: int
    data: bytes = field(repr=False)

    def body_fields(self) -> list:
        return [self.part, self.data]

    def body_chunks(self) -> tuple[bytes, ...]:
        """msgpack's bytes for ``[part, data]`` without copying the (large) data: the array and bin headers
        are written here exactly as msgpack writes them, the data follows as it is."""
        n = len(self.data)
        if n > 0xFFFFFFFF:
            return super().body_chunks()  # beyond msgpack's bin format: let msgpack raise
        if n <= 0xFF:
            head = b"\xc4" + n.to_bytes(1, "big")
        elif n <= 0xFFFF:
            head = b"\xc5" + n.to_bytes(2, "big")
        else:
            head = b"\xc6" + n.to_bytes(4, "big")
        return (b"\x92" + msgpack.packb(self.part) + head, self.data)

    @classmethod
    def from_fields(cls, h: Header, f: list, limits: Limits):
        return cls(
            h.run_id,
            h.step,
            h.sender,
            _int(f[0], 0, limits.max_peers - 1, "part"),
            _f32(f[1], limits.max_part_elems, "data"),
        )

    def tensor(self) -> torch.Tensor:
        """The part as a new float32 tensor (a copy: the message stays immutable)."""
        return torch.from_numpy(np.frombuffer(self.data, dtype="<f4").copy())

    # Memoized pure functions of the message's bytes. A decoded message is immutable and, in the simulator,
    # shared by every peer that received the same bytes (`DecodeCache`), so each is computed once per message.
    @functools.cached_property
    def all_finite(self) -> bool:
        """Whether every float32 value of the part is finite."""
        return bool(np.isfinite(np.frombuffer(self.data, dtype="<f4")).all())

    def data_digest(self, domain: str, run_id: bytes, step: int, sender: bytes, index: int) -> bytes:
        """`bytes_digest(domain, run_id, step, sender, index, self.data)`, memoized per argument list."""
        memo = self.__dict__.setdefault("_digests", {})
        key = (domain, run_id, step, sender, index)
        h = memo.get(key)
        if h is None:
            h = memo[key] = bytes_digest(domain, run_id, step, sender, index, self.data)
        return h

    @classmethod
    def of(cls, run_id: bytes, step: int, sender: bytes, part: int, t: torch.Tensor):
        return cls(
            run_id, step, sender, part, np.ascontiguousarray(t.detach().numpy(), dtype="<f4").tobytes()
        )


@dataclass(frozen=True)
class GradPart(_TensorMessage):
    """Step 3: part `part` of the sender's gradient, sent to that part's aggregator."""

    kind: ClassVar[Kind] = Kind.GRAD_PART


@dataclass(frozen=True)
class AggPart(_TensorMessage):
    """Step 5: the aggregated part ĝ[part], sent by its aggregator to everyone."""

    kind: ClassVar[Kind] = Kind.AGG_PART


@dataclass(frozen=True)
class AggCommit(Message):
    """Step 5: H(ĝ[part]) and the senders whose parts the aggregator included (sorted peer ids), broadcast by
    the aggregator. Declaring the inputs makes omissions accountable (see `BtardPeer._finish`)."""

    kind: ClassVar[Kind] = Kind.AGG_COMMIT
    part: int
    agg_hash: bytes
    included: tuple[bytes, ...] = ()

    def body_fields(self) -> list:
        return [self.part, self.agg_hash, self.included]

    @classmethod
    def from_fields(cls, h: Header, f: list, limits: Limits) -> AggCommit:
        inc = f[2]
        if not isinstance(inc, list) or len(inc) > limits.max_peers:
            raise MalformedMessage("bad-field", "included: expected a list of at most max_peers ids")
        return cls(
            h.run_id,
            h.step,
            h.sender,
            _int(f[0], 0, limits.max_peers - 1, "part"),
            _bytes(f[1], DIGEST_BYTES, "agg_hash"),
            tuple(_bytes(x, PEER_ID_BYTES, "included id") for x in inc),
        )


@dataclass(frozen=True)
class MprngCommit(Message):
    """Step 6: H(t, sender, secret), and the sender's slowest phase of the previous step in milliseconds (0 if
    unknown or if a deadline had to pass), from which the next step's phase timeout is derived."""

    kind: ClassVar[Kind] = Kind.MPRNG_COMMIT
    commitment: bytes
    phase_hint_ms: int = 0

    def body_fields(self) -> list:
        return [self.commitment, self.phase_hint_ms]

    @classmethod
    def from_fields(cls, h: Header, f: list, limits: Limits) -> MprngCommit:
        return cls(
            h.run_id,
            h.step,
            h.sender,
            _bytes(f[0], DIGEST_BYTES, "commitment"),
            _int(f[1], 0, MAX_PHASE_HINT_MS, "phase_hint_ms"),
        )


@dataclass(frozen=True)
class MprngReveal(Message):
    """Step 6: the secret behind the sender's MPRNG commitment."""

    kind: ClassVar[Kind] = Kind.MPRNG_REVEAL
    secret: bytes

    def body_fields(self) -> list:
        return [self.secret]

    @classmethod
    def from_fields(cls, h: Header, f: list, limits: Limits) -> MprngReveal:
        return cls(h.run_id, h.step, h.sender, _bytes(f[0], 32, "secret"))


@dataclass(frozen=True)
class Proj(Message):
    """Step 7: for every part j, n_i^j = ‖g_i[j] − ĝ[j]‖ and K projections s_i^{j,k} = ⟨z_k[j], g_i[j] − ĝ[j]⟩.

    Stored as float64 bytes: norms (n,), projections (n, K) row-major.
    """

    kind: ClassVar[Kind] = Kind.PROJ
    num_projections: int
    norms_raw: bytes = field(repr=False)
    projs_raw: bytes = field(repr=False)

    def body_fields(self) -> list:
        return [self.num_projections, self.norms_raw, self.projs_raw]

    @classmethod
    def from_fields(cls, h: Header, f: list, limits: Limits) -> Proj:
        k = _int(f[0], 1, limits.max_projections, "num_projections")
        norms = _bytes(f[1], None, "norms")
        projs = _bytes(f[2], None, "projections")
        n = len(norms) // 8
        if len(norms) % 8 or not 1 <= n <= limits.max_peers or len(projs) != 8 * n * k:
            raise MalformedMessage("bad-field", "PROJ arrays have inconsistent sizes")
        msg = cls(h.run_id, h.step, h.sender, k, norms, projs)
        if not (np.isfinite(msg.norms).all() and np.isfinite(msg.projections).all()) or (msg.norms < 0).any():
            raise MalformedMessage("bad-field", "PROJ values must be finite and norms non-negative")
        return msg

    @functools.cached_property
    def norms(self) -> np.ndarray:
        """(n,) read-only view of the bytes."""
        return np.frombuffer(self.norms_raw, dtype="<f8")

    @functools.cached_property
    def projections(self) -> np.ndarray:
        """(n, K) read-only view of the bytes."""
        return np.frombuffer(self.projs_raw, dtype="<f8").reshape(-1, self.num_projections)

    @classmethod
    def of(cls, run_id: bytes, step: int, sender: bytes, norms: np.ndarray, projs: np.ndarray) -> Proj:
        projs = np.ascontiguousarray(projs, dtype="<f8")
        return cls(
            run_id,
            step,
            sender,
            projs.shape[1],
            np.ascontiguousarray(norms, "<f8").tobytes(),
            projs.tobytes(),
        )


@dataclass(frozen=True)
class Accuse(Message):
    """A signed accusation with evidence (raw signed messages, verified by every receiver)."""

    kind: ClassVar[Kind] = Kind.ACCUSE
    accused: bytes
    about_step: int
    reason: Reason
    part: int
    evidence: tuple[bytes, ...] = field(repr=False)

    def body_fields(self) -> list:
        return [self.accused, self.about_step, int(self.reason), self.part, self.evidence]

    @classmethod
    def from_fields(cls, h: Header, f: list, limits: Limits) -> Accuse:
        ev = f[4]
        if not isinstance(ev, list) or len(ev) > limits.max_evidence:
            raise MalformedMessage("bad-field", "evidence: expected a list within limits")
        try:
            reason = Reason(_int(f[2], 0, 255, "reason"))
        except ValueError as e:
            raise MalformedMessage("bad-field", "unknown accusation reason") from e
        return cls(
            h.run_id,
            h.step,
            h.sender,
            _bytes(f[0], PEER_ID_BYTES, "accused"),
            _int(f[1], 0, 2**63 - 1, "about_step"),
            reason,
            _int(f[3], 0, limits.max_peers, "part"),
            tuple(_bytes(x, None, "evidence item") for x in ev),
        )

    def slot(self) -> tuple:
        return (self.kind, self.sender, (self.accused, self.about_step, int(self.reason), self.part))


@dataclass(frozen=True)
class Digest(Message):
    """A round message of a phase's agreement (see `agreement.py`): the items the sender accepted in the
    previous round, as (kind, origin, index, message digest), and the digests of the other members' round
    messages it forwards with it as their support. Round 1 of the ACCUSE phase is the sender's manifest."""

    kind: ClassVar[Kind] = Kind.DIGEST
    phase: int
    round: int
    entries: tuple[tuple[int, bytes, int, bytes], ...]
    support: tuple[bytes, ...] = ()

    def body_fields(self) -> list:
        return [self.phase, self.round, self.entries, self.support]

    @classmethod
    def from_fields(cls, h: Header, f: list, limits: Limits) -> Digest:
        ents, sup = f[2], f[3]
        if not isinstance(ents, list) or len(ents) > limits.max_digest_entries:
            raise MalformedMessage("bad-field", "digest entries")
        if not isinstance(sup, list) or len(sup) > limits.max_digest_entries:
            raise MalformedMessage("bad-field", "digest support")
        out = []
        for e in ents:
            if not isinstance(e, list) or len(e) != 4:
                raise MalformedMessage("bad-field", "digest entry")
            out.append(
                (
                    _int(e[0], 1, 255, "kind"),
                    _bytes(e[1], PEER_ID_BYTES, "origin"),
                    _int(e[2], 0, limits.max_peers, "index"),
                    _bytes(e[3], DIGEST_BYTES, "hash"),
                )
            )
        return cls(
            h.run_id,
            h.step,
            h.sender,
            _int(f[0], 1, 255, "phase"),
            _int(f[1], 1, limits.max_peers + 1, "round"),
            tuple(out),
            tuple(_bytes(x, DIGEST_BYTES, "support digest") for x in sup),
        )

    def slot(self) -> tuple:
        return (self.kind, self.sender, (self.phase, self.round))


@dataclass(frozen=True)
class Pull(Message):
    """Ask for a message: (kind, origin sender, index) of this step. Also the public re-send request."""

    kind: ClassVar[Kind] = Kind.PULL
    want_kind: int
    origin: bytes
    index: int
    public: bool = False

    def body_fields(self) -> list:
        return [self.want_kind, self.origin, self.index, int(self.public)]

    @classmethod
    def from_fields(cls, h: Header, f: list, limits: Limits) -> Pull:
        return cls(
            h.run_id,
            h.step,
            h.sender,
            _int(f[0], 1, 255, "want_kind"),
            _bytes(f[1], PEER_ID_BYTES, "origin"),
            _int(f[2], 0, limits.max_peers, "index"),
            bool(_int(f[3], 0, 1, "public")),
        )

    def slot(self) -> tuple:
        return (self.kind, self.sender, (self.want_kind, self.origin, self.index, self.public))


@dataclass(frozen=True)
class _Announcement(Message):
    """A message whose header says it all (an empty body): who, which run, which step."""

    def body_fields(self) -> list:
        return []

    @classmethod
    def from_fields(cls, h: Header, f: list, limits: Limits) -> _Announcement:
        return cls(h.run_id, h.step, h.sender)


@dataclass(frozen=True)
class Join(_Announcement):
    """A peer outside the run asks to join it; signed by the joiner (not yet a member). Members keep JOINs
    with the step's public items, so the ACCUSE-phase digest exchange makes every honest member admit the
    same joiners (see `BtardPeer._finish`)."""

    kind: ClassVar[Kind] = Kind.JOIN


@dataclass(frozen=True)
class Leave(_Announcement):
    """A member leaves gracefully after this step (it still completes it). Kept with the step's public items
    like a JOIN, so every honest member drops it from the next step's members at the same time."""

    kind: ClassVar[Kind] = Kind.LEAVE


_BODY_LEN = {
    GradCommit: 2,
    GradPart: 2,
    AggPart: 2,
    AggCommit: 3,
    MprngCommit: 2,
    MprngReveal: 1,
    Proj: 3,
    Accuse: 5,
    Digest: 4,
    Pull: 4,
    Join: 0,
    Leave: 0,
}
MESSAGE_TYPES: dict[Kind, type[Message]] = {cls.kind: cls for cls in _BODY_LEN}


@dataclass(frozen=True)
class Signed:
    """A decoded message with its exact wire bytes and message digest (the identity of the message)."""

    msg: Message
    raw: bytes = field(repr=False)
    msg_digest: bytes

    @property
    def signature(self) -> bytes:
        return self.raw[-SIGNATURE_BYTES:]


def _message_digest(header: bytes, *body_chunks: bytes | memoryview) -> bytes:
    """The signed digest of a message: H(header, H(body)), the body given whole or as consecutive chunks."""
    body_hash = blake3.blake3()
    for c in body_chunks:
        body_hash.update(c)
    return digest("msg", header, body_hash.digest())


def encode(msg: Message, identity: Identity) -> Signed:
    """Sign and encode `msg`. The identity must be the message's sender."""
    if identity.peer_id != msg.sender:
        raise ValueError("a message can only be signed by its sender")
    chunks = msg.body_chunks()
    body_len = sum(len(c) for c in chunks)
    header = _HEADER.pack(MAGIC, PROTOCOL_VERSION, int(msg.kind), msg.run_id, msg.step, msg.sender, body_len)
    d = _message_digest(header, *chunks)
    return Signed(msg, b"".join((header, *chunks, identity.sign(d))), d)


class DecodeCache:
    """Remembers decoded messages by their exact bytes. `decode` is a pure function of (bytes, limits), so
    peers simulated in one process can share one cache and decode and verify each distinct message once.
    Never share it between processes or trust boundaries: it is an optimisation of the simulator. Bounded in
    entries and in bytes (the oldest go first: at d = 11.2M one step's parts alone take ~700 MB)."""

    def __init__(self, max_entries: int = 50_000, max_bytes: int = 1 << 30) -> None:
        self._max = max_entries
        self._max_bytes = max_bytes
        self._bytes = 0
        self._store: dict[tuple[bytes, Limits], Signed] = {}

    def decode(self, raw: bytes, limits: Limits) -> Signed:
        key = (raw, limits)
        hit = self._store.get(key)
        if hit is not None:
            return hit
        s = decode(raw, limits)
        self._store[key] = s
        self._bytes += len(s.raw)
        while len(self._store) > self._max or (self._bytes > self._max_bytes and len(self._store) > 1):
            oldest = next(iter(self._store))
            self._bytes -= len(self._store.pop(oldest).raw)
        return s


def decode(raw: bytes, limits: Limits = Limits()) -> Signed:
    """Parse, bound-check and signature-verify one message (see module docstring for guarantees)."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise MalformedMessage("bad-type", "message must be bytes")
    raw = bytes(raw)
    if len(raw) > limits.max_message_bytes:
        raise MalformedMessage("oversized", f"{len(raw)} bytes > limit {limits.max_message_bytes}")
    if len(raw) < HEADER_BYTES + SIGNATURE_BYTES:
        raise MalformedMessage("truncated", f"{len(raw)} bytes is shorter than header + signature")
    magic, version, kind, run_id, step, sender, body_len = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise MalformedMessage("bad-magic", "not a btard message")
    if version != PROTOCOL_VERSION:
        raise MalformedMessage("bad-version", f"protocol version {version}, expected {PROTOCOL_VERSION}")
    if HEADER_BYTES + body_len + SIGNATURE_BYTES != len(raw):
        raise MalformedMessage("bad-length", f"declared body of {body_len} bytes does not match message size")
    try:
        cls = MESSAGE_TYPES[Kind(kind)]
    except ValueError as e:
        raise MalformedMessage("bad-kind", f"unknown message kind {kind}") from e
    header = raw[:HEADER_BYTES]
    body = memoryview(raw)[HEADER_BYTES : HEADER_BYTES + body_len]  # no copy of a large body
    d = _message_digest(header, body)
    if not verify(sender, d, raw[-SIGNATURE_BYTES:]):
        raise MalformedMessage("bad-signature", "signature does not verify for the claimed sender")
    try:
        fields = msgpack.unpackb(
            body,
            use_list=True,
            raw=True,
            strict_map_key=True,
            max_bin_len=4 * limits.max_part_elems,
            max_str_len=0,
            max_array_len=max(limits.max_digest_entries, limits.max_peers),
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise MalformedMessage("bad-body", f"undecodable body ({type(e).__name__})") from e
    if not isinstance(fields, list) or len(fields) != _BODY_LEN[cls]:
        raise MalformedMessage("bad-body", f"{cls.__name__} body must be a list of {_BODY_LEN[cls]} fields")
    msg = cls.from_fields(Header(run_id, step, sender), fields, limits)
    return Signed(msg, raw, d)
