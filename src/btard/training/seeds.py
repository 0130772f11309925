"""Public seeds: which minibatch (and augmentation) a peer must use at a step (protocol §3 step 1).

ξ_i^t = BLAKE3("batch" | r^{t−1} | t | id_i), every field length-prefixed, so anyone can recompute any peer's
batch and nobody can choose their data before r^{t−1} is known.
"""

from __future__ import annotations

import blake3
import torch

__all__ = ["SEED_BYTES", "batch_seed", "generator_from_seed"]

SEED_BYTES = 32  # BLAKE3's default output: 256 bits, ample for a public, unpredictable seed.
_BATCH_DOMAIN = b"batch"
_GENERATOR_DOMAIN = b"btard/torch-generator/v1"
_MAX_FIELD = 1 << 20  # a peer id or random value is tens of bytes; anything this large is a bug


def _field(data: bytes) -> bytes:
    if len(data) > _MAX_FIELD:
        raise ValueError(f"seed field of {len(data)} bytes exceeds {_MAX_FIELD}")
    return len(data).to_bytes(8, "little") + data


def batch_seed(r_prev: bytes, step: int, peer_id: bytes) -> bytes:
    """ξ = BLAKE3(len|"batch" | len|r_prev | len|step | len|peer_id), 32 bytes.

    ``step`` is encoded as 8 little-endian unsigned bytes; every field carries an 8-byte length prefix, so no
    two distinct inputs give the same hashed bytes.
    """
    if not isinstance(r_prev, bytes | bytearray) or not isinstance(peer_id, bytes | bytearray):
        raise TypeError("r_prev and peer_id must be bytes")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 1 << 64:
        raise ValueError(f"step must be an int in [0, 2**64), got {step!r}")
    h = blake3.blake3()
    for part in (_BATCH_DOMAIN, bytes(r_prev), step.to_bytes(8, "little"), bytes(peer_id)):
        h.update(_field(part))
    return h.digest(SEED_BYTES)


def generator_from_seed(seed: bytes) -> torch.Generator:
    """A CPU ``torch.Generator`` whose whole stream is a function of ``seed`` (any length ≥ 1).

    The seed is hashed once more under its own domain and the first 63 bits seed the generator, so related
    seeds give unrelated streams.
    """
    if not isinstance(seed, bytes | bytearray) or len(seed) == 0:
        raise TypeError("seed must be non-empty bytes")
    h = blake3.blake3(_field(_GENERATOR_DOMAIN) + _field(bytes(seed))).digest(8)
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(h, "little") & ((1 << 63) - 1))
    return g
