"""Signed records that bind a protocol id (Ed25519 public key) to a transport address.

A record says "the holder of protocol key P is reachable at libp2p peer id X via these multiaddrs until time
E" (and, for a run record, "… and takes part in run R"). P signs it, so nobody can redirect P's traffic; the
reader verifies it before any use. The record carries no DHT key: the key it may be stored under is a function
of its content (:func:`record_key`), so a record cannot be replayed under another key either.

Wire format (msgpack, no extension types): ``[body, signature]`` with
``body = msgpack([VERSION, protocol_id, transport_id, [maddr, ...], run_id or "", expiration])`` and
``signature = Ed25519_sign(BLAKE3(RECORD_DOMAIN || body))``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import blake3
import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from btard.transport.base import PROTOCOL_ID_BYTES

Signer = Callable[[bytes], bytes]
"""``sign(digest) -> 64-byte Ed25519 signature`` with the protocol key; the transport never holds the key."""

RECORD_VERSION = 1
RECORD_DOMAIN = b"btard/transport/peer-record/v1\x00"  # domain separation from every protocol message digest
SIGNATURE_BYTES = 64

# Limits, all checked before decoding further. A record is a few hundred bytes in practice (one libp2p id of
# 38 bytes, 1-4 multiaddrs of ~60 chars); the bounds leave 10x room and stop a peer from parking large blobs
# in everyone's DHT storage.
MAX_RECORD_BYTES = 4096
MAX_TRANSPORT_ID_BYTES = 64  # libp2p peer ids are multihashes: 38 bytes for RSA (sha256) and Ed25519 keys
MAX_MADDRS = 16
MAX_MADDR_CHARS = 256
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")  # goes into a DHT key: no "/" so keys cannot collide


class RecordError(ValueError):
    """A record is malformed, badly signed, expired, or does not belong where it was found."""


@dataclass(frozen=True)
class PeerRecord:
    """A verified binding of ``protocol_id`` to ``transport_id`` (a libp2p peer id) and its multiaddrs."""

    protocol_id: bytes
    transport_id: bytes
    maddrs: tuple[str, ...]
    run_id: str | None  # None: the peer's own lookup record; a string: its membership record for that run
    expiration: float


def check_run_id(run_id: str) -> str:
    """Return ``run_id`` if it is 1-64 characters of ``[A-Za-z0-9._-]``; raise ``ValueError`` otherwise."""
    if not isinstance(run_id, str) or RUN_ID_PATTERN.fullmatch(run_id) is None:
        raise ValueError(f"run id must match {RUN_ID_PATTERN.pattern}, got {run_id!r}")
    return run_id


def peer_key(protocol_id: bytes) -> str:
    """DHT key of a peer's lookup record."""
    return f"btard/peer/{protocol_id.hex()}"


def run_key(run_id: str) -> str:
    """DHT key of a run's membership dictionary (subkey = protocol id hex)."""
    return f"btard/{check_run_id(run_id)}/peers"


def record_key(record: PeerRecord) -> str:
    """The only DHT key under which ``record`` may be stored."""
    return peer_key(record.protocol_id) if record.run_id is None else run_key(record.run_id)


def record_digest(body: bytes) -> bytes:
    """The 32-byte digest that the protocol key signs."""
    return blake3.blake3(RECORD_DOMAIN + body).digest()


def _check_fields(
    protocol_id: bytes, transport_id: bytes, maddrs: Sequence[str], run_id: str | None, expiration: float
) -> None:
    if not isinstance(protocol_id, bytes) or len(protocol_id) != PROTOCOL_ID_BYTES:
        raise RecordError("protocol id must be 32 bytes")
    if not isinstance(transport_id, bytes) or not 0 < len(transport_id) <= MAX_TRANSPORT_ID_BYTES:
        raise RecordError("bad transport id")
    if not isinstance(maddrs, list | tuple) or len(maddrs) > MAX_MADDRS:
        raise RecordError("bad multiaddr list")
    for maddr in maddrs:
        if not isinstance(maddr, str) or not 0 < len(maddr) <= MAX_MADDR_CHARS or not maddr.startswith("/"):
            raise RecordError("bad multiaddr")
    if run_id is not None:
        try:
            check_run_id(run_id)
        except ValueError as e:
            raise RecordError(str(e)) from None
    if not isinstance(expiration, float) or not math.isfinite(expiration):
        raise RecordError("bad expiration")


def encode_record(record: PeerRecord, sign: Signer) -> bytes:
    """Serialize and sign ``record`` with ``sign`` (which must hold the key of ``record.protocol_id``)."""
    _check_fields(record.protocol_id, record.transport_id, record.maddrs, record.run_id, record.expiration)
    body = msgpack.packb(
        [
            RECORD_VERSION,
            record.protocol_id,
            record.transport_id,
            list(record.maddrs),
            record.run_id or "",
            record.expiration,
        ],
        use_bin_type=True,
    )
    signature = sign(record_digest(body))
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise ValueError("sign() must return a 64-byte Ed25519 signature")
    blob = msgpack.packb([body, signature], use_bin_type=True)
    if len(blob) > MAX_RECORD_BYTES:
        raise ValueError(f"record of {len(blob)} bytes exceeds MAX_RECORD_BYTES={MAX_RECORD_BYTES}")
    return blob


def _unpack(data: bytes, what: str) -> object:
    try:
        # No ext hook, no object hook: an extension type from a peer stays an inert ExtType and fails below.
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_RECORD_BYTES,
            max_bin_len=MAX_RECORD_BYTES,
            max_array_len=MAX_MADDRS + 8,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as e:  # msgpack raises many types (ValueError, ExtraData, FormatError, StackError, ...)
        raise RecordError(f"undecodable {what}: {type(e).__name__}") from None


def parse_record(blob: bytes) -> PeerRecord:
    """Parse a record and verify everything that does not depend on the clock: size, format, and the
    signature by its own protocol id. Raises :class:`RecordError`.

    This is what DHT nodes check on store and fetch: the verdict must be the same on every node, or a record
    near a clock boundary would make some nodes drop whole dictionaries of honest records."""
    if not isinstance(blob, bytes) or len(blob) > MAX_RECORD_BYTES:
        raise RecordError("record is not bytes or too large")
    outer = _unpack(blob, "record")
    if not isinstance(outer, list) or len(outer) != 2:
        raise RecordError("record must be [body, signature]")
    body, signature = outer
    if not isinstance(body, bytes) or not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise RecordError("bad body or signature type")
    fields = _unpack(body, "record body")
    if not isinstance(fields, list) or len(fields) != 6:
        raise RecordError("record body must have 6 fields")
    version, protocol_id, transport_id, maddrs, run_id, expiration = fields
    if version != RECORD_VERSION:
        raise RecordError(f"unsupported record version {version!r}")
    if not isinstance(run_id, str):
        raise RecordError("bad run id")
    run = run_id or None
    _check_fields(protocol_id, transport_id, maddrs, run, expiration)
    try:
        Ed25519PublicKey.from_public_bytes(protocol_id).verify(signature, record_digest(body))
    except (InvalidSignature, ValueError):
        raise RecordError("bad signature") from None
    return PeerRecord(protocol_id, transport_id, tuple(maddrs), run, expiration)


def check_fresh(record: PeerRecord, *, now: float, max_ttl: float, max_clock_skew: float) -> PeerRecord:
    """Return ``record`` if ``now < expiration <= now + max_ttl + max_clock_skew``, else raise RecordError."""
    if not now < record.expiration <= now + max_ttl + max_clock_skew:
        raise RecordError(f"stale or too distant expiration ({record.expiration - now:+.1f} s from now)")
    return record


def decode_record(blob: bytes, *, now: float, max_ttl: float, max_clock_skew: float) -> PeerRecord:
    """Everything a reader checks before use: :func:`parse_record`, then :func:`check_fresh`."""
    return check_fresh(parse_record(blob), now=now, max_ttl=max_ttl, max_clock_skew=max_clock_skew)
