"""Identities, signatures and domain-separated hashing.

Guarantees:
- a peer id is the 32-byte raw Ed25519 public key; there is no process-wide default key;
- signatures are over 32-byte BLAKE3 digests, never over raw data;
- every digest is domain-separated and its fields are length-prefixed, so no two different field lists (or
  domains) can produce the same hashed byte string.
"""

from __future__ import annotations

import functools
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import blake3
import numpy as np
import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PrivateFormat, PublicFormat

PEER_ID_BYTES = 32
SIGNATURE_BYTES = 64
DIGEST_BYTES = 32
_HASH_PREFIX = b"btard/v1/"

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("btard hashes raw little-endian tensor bytes; big-endian hosts are not supported")

Field = bytes | str | int


def _encode_field(field: Field) -> bytes:
    t = type(field)  # exact types first (the common case), then the general rules
    if t is bytes:
        return b"b" + _U64(len(field)) + field
    if t is int:
        return b"i" + _I64(field)
    if isinstance(field, bool):
        raise TypeError("booleans are ambiguous as hash fields; pass an int")
    if isinstance(field, int):
        return b"i" + _I64(field)
    if isinstance(field, str):
        data = field.encode()
        return b"s" + _U64(len(data)) + data
    if isinstance(field, bytes | bytearray | memoryview):
        data = bytes(field)
        return b"b" + _U64(len(data)) + data
    raise TypeError(f"cannot hash field of type {type(field).__name__}")


_I64 = struct.Struct("<q").pack
_U64 = struct.Struct("<Q").pack
_DOMAINS: dict[str, bytes] = {}  # domain -> its hashed prefix (domains are a small set of constants)
_LARGE_FIELD = 1 << 14  # bytes fields above this are streamed into the hash instead of joined (no copy)


def _prefix(domain: str) -> bytes:
    pre = _DOMAINS.get(domain)
    if pre is None:
        pre = _HASH_PREFIX + _encode_field(domain)
        if len(_DOMAINS) < 1024:
            _DOMAINS[domain] = pre
    return pre


def digest(domain: str, *fields: Field) -> bytes:
    """BLAKE3 digest of (domain, fields) with every field typed and length-prefixed."""
    # Hashing is streaming: the digest of the concatenated encodings, however they are fed in. Small fields
    # are joined into one update; large byte strings are fed directly.
    parts = [_prefix(domain)]
    h = None
    for f in fields:
        if type(f) is bytes and len(f) > _LARGE_FIELD:
            parts.append(b"b" + _U64(len(f)))
            if h is None:
                h = blake3.blake3(b"".join(parts))
            else:
                h.update(b"".join(parts))
            h.update(f)
            parts = []
        else:
            parts.append(_encode_field(f))
    if h is None:
        return blake3.blake3(b"".join(parts)).digest()
    h.update(b"".join(parts))
    return h.digest()


def tensor_view(t: torch.Tensor) -> np.ndarray:
    """Contiguous little-endian float32 numpy view (no copy when already contiguous float32 on CPU)."""
    if t.dtype != torch.float32:
        raise TypeError(f"protocol tensors are float32, got {t.dtype}")
    return np.ascontiguousarray(t.detach().cpu().numpy())


def _part_header(domain: str, run_id: bytes, step: int, sender: bytes, index: int, size: int) -> bytes:
    return b"".join(
        (
            _prefix(domain),
            *(_encode_field(f) for f in (run_id, step, sender, index)),
            _F32,
            _encode_field(size),
        )
    )


_F32 = _encode_field("f32")


def tensor_digest(domain: str, run_id: bytes, step: int, sender: bytes, index: int, t: torch.Tensor) -> bytes:
    """Digest of the exact bytes a tensor travels as, bound to (domain, run, step, sender, part index)."""
    arr = tensor_view(t)
    h = blake3.blake3(_part_header(domain, run_id, step, sender, index, arr.size))
    h.update(memoryview(arr).cast("B"))
    return h.digest()


def bytes_digest(domain: str, run_id: bytes, step: int, sender: bytes, index: int, raw: bytes) -> bytes:
    """Same as `tensor_digest` but for the raw float32 bytes as received (no tensor built)."""
    h = blake3.blake3(_part_header(domain, run_id, step, sender, index, len(raw) // 4))
    h.update(raw)
    return h.digest()


def params_digest(params: torch.Tensor) -> bytes:
    """H(x): the digest peers put in their GRAD_COMMIT (the raw float32 bytes of the flat parameters)."""
    return digest("params", params.detach().contiguous().cpu().numpy().tobytes())


def training_state_digest(params: torch.Tensor, optimizer_state: dict[str, torch.Tensor]) -> bytes:
    """H(x, optimizer state): what swarm peers commit in GRAD_COMMIT, so a joiner can check both the parameters
    and the optimizer state it downloads against what the majority committed. Keys are hashed in sorted
    order with each tensor's dtype, shape and raw bytes."""
    fields: list[Field] = [params_digest(params)]
    for key in sorted(optimizer_state):
        t = optimizer_state[key].detach().contiguous().cpu()
        fields += [key, str(t.dtype), ",".join(map(str, t.shape)), t.numpy().tobytes()]
    return digest("training-state", *fields)


def verify(public_key: bytes, message_digest: bytes, signature: bytes) -> bool:
    """True iff `signature` is a valid Ed25519 signature of `message_digest` by `public_key`."""
    if len(public_key) != PEER_ID_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message_digest)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """An Ed25519 key pair. `peer_id` is the raw public key. Create one per peer; never share."""

    _key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """Deterministic identity from 32 seed bytes (for simulations and tests only)."""
        if len(seed) != 32:
            seed = digest("identity-seed", seed)
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def load(cls, path: str | Path) -> Identity:
        raw = Path(path).read_bytes()
        if len(raw) != 32:
            raise ValueError(f"{path}: expected a 32-byte raw Ed25519 private key, found {len(raw)} bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    @classmethod
    def load_or_create(cls, path: str | Path) -> Identity:
        p = Path(path)
        if p.exists():
            return cls.load(p)
        ident = cls.generate()
        ident.save(p)
        return ident

    def save(self, path: str | Path) -> None:
        """Write the raw private key with mode 0600."""
        raw = self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, _no_encryption())
        fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)

    @functools.cached_property
    def peer_id(self) -> bytes:
        return self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def sign(self, message_digest: bytes) -> bytes:
        if len(message_digest) != DIGEST_BYTES:
            raise ValueError("sign a 32-byte digest, not raw data")
        return self._key.sign(message_digest)

    def __repr__(self) -> str:  # never print key material
        return f"Identity({short_id(self.peer_id)})"


def _no_encryption():
    from cryptography.hazmat.primitives.serialization import NoEncryption

    return NoEncryption()


def short_id(peer_id: bytes) -> str:
    """First 8 hex digits of a peer id, for logs."""
    return peer_id.hex()[:8]
