"""Message encoding: round trips, and any truncation, garbage or bit flip gives a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from btard.crypto import Identity
from btard.protocol.errors import MalformedMessage
from btard.protocol.messages import (
    Accuse,
    AggCommit,
    AggPart,
    Digest,
    GradCommit,
    GradPart,
    Limits,
    MprngCommit,
    MprngReveal,
    Proj,
    Pull,
    Reason,
    decode,
    encode,
)

ME = Identity.from_seed(b"m" * 32)  # the default signer of generated messages
RUN = b"r" * 16
digests = st.binary(min_size=32, max_size=32)
steps = st.integers(0, 2**63 - 1)
parts = st.integers(0, 1023)
floats = st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=0, max_size=50)


@st.composite
def messages(draw):
    t = draw(steps)
    pid = ME.peer_id
    choice = draw(st.integers(0, 9))
    if choice == 0:
        return GradCommit(RUN, t, pid, draw(digests), tuple(draw(st.lists(digests, min_size=1, max_size=20))))
    if choice in (1, 2):
        cls = GradPart if choice == 1 else AggPart
        return cls.of(RUN, t, pid, draw(parts), torch.tensor(draw(floats), dtype=torch.float32))
    if choice == 3:
        return AggCommit(RUN, t, pid, draw(parts), draw(digests))
    if choice == 4:
        return MprngCommit(RUN, t, pid, draw(digests))
    if choice == 5:
        return MprngReveal(RUN, t, pid, draw(digests))
    if choice == 6:
        n, k = draw(st.integers(1, 8)), draw(st.integers(1, 8))
        rng = np.random.default_rng(draw(st.integers(0, 1000)))
        return Proj.of(RUN, t, pid, np.abs(rng.normal(size=n)), rng.normal(size=(n, k)))
    if choice == 7:
        ev = tuple(draw(st.lists(st.binary(max_size=64), max_size=4)))
        return Accuse(
            RUN, t, pid, draw(digests), draw(steps), Reason(draw(st.integers(1, 7))), draw(parts), ev
        )
    if choice == 8:
        ents = tuple(draw(st.lists(st.tuples(st.integers(1, 255), digests, parts, digests), max_size=10)))
        sup = tuple(draw(st.lists(digests, max_size=4)))
        return Digest(RUN, t, pid, draw(st.integers(1, 255)), draw(st.integers(1, 9)), ents, sup)
    return Pull(RUN, t, pid, draw(st.integers(1, 255)), draw(digests), draw(parts), draw(st.booleans()))


@settings(max_examples=150, deadline=None)
@given(messages())
def test_round_trip(msg):
    s = encode(msg, ME)
    d = decode(s.raw)
    assert d.msg == msg and d.msg_digest == s.msg_digest and d.raw == s.raw


@settings(max_examples=150, deadline=None)
@given(messages(), st.data())
def test_truncation_and_bit_flips_are_rejected(msg, data):
    raw = encode(msg, ME).raw
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(MalformedMessage):
        decode(raw[:cut])
    pos = data.draw(st.integers(0, len(raw) - 1))
    bit = data.draw(st.integers(0, 7))
    flipped = raw[:pos] + bytes([raw[pos] ^ (1 << bit)]) + raw[pos + 1 :]
    with pytest.raises(MalformedMessage):
        decode(flipped)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_is_rejected_with_a_reason(garbage):
    with pytest.raises(MalformedMessage) as e:
        decode(garbage)
    assert e.value.reason


def test_oversized_is_rejected_before_parsing():
    lim = Limits(max_part_elems=16)
    big = encode(GradPart.of(RUN, 1, ME.peer_id, 0, torch.zeros(1000)), ME).raw
    with pytest.raises(MalformedMessage, match="oversized"):
        decode(big, lim)


def test_forged_sender_is_rejected():
    other = Identity.from_seed(b"o" * 32)
    raw = encode(MprngCommit(RUN, 1, ME.peer_id, b"c" * 32), ME).raw
    forged = raw[:23] + other.peer_id + raw[55:]
    with pytest.raises(MalformedMessage, match="signature"):
        decode(forged)


def test_cannot_sign_for_someone_else():
    other = Identity.from_seed(b"o" * 32)
    with pytest.raises(ValueError):
        encode(MprngCommit(RUN, 1, other.peer_id, b"c" * 32), ME)


def test_non_finite_projection_values_are_rejected():
    raw = encode(Proj.of(RUN, 1, ME.peer_id, np.array([1.0, np.nan]), np.zeros((2, 2))), ME).raw
    with pytest.raises(MalformedMessage, match="finite"):
        decode(raw)


@settings(max_examples=150, deadline=None)
@given(messages())
def test_body_chunks_are_msgpacks_bytes(msg):
    """`encode` writes tensor bodies without msgpack (no copy of the data): the bytes must be msgpack's."""
    import msgpack

    assert b"".join(msg.body_chunks()) == msgpack.packb(msg.body_fields(), use_bin_type=True)


@pytest.mark.parametrize("part", [0, 127, 128, 255, 256, 65535, 65536, 1023])
@pytest.mark.parametrize("n", [0, 1, 63, 64, 16383, 16384, 300_000])
def test_tensor_body_headers_at_size_boundaries(part, n):
    import msgpack

    m = GradPart.of(RUN, 1, ME.peer_id, part, torch.arange(n, dtype=torch.float32))
    assert b"".join(m.body_chunks()) == msgpack.packb([part, m.data], use_bin_type=True)
    if part < Limits().max_peers:
        assert decode(encode(m, ME).raw).msg == m
