"""Public seeds: ξ = BLAKE3("batch" | r_prev | t | id), generators and index sampling derived from them."""

import blake3
import pytest
import torch

from btard.training import batch_seed, generator_from_seed
from btard.training.data import sample_indices


def _expected(r_prev: bytes, step: int, peer_id: bytes) -> bytes:
    fields = [b"batch", r_prev, step.to_bytes(8, "little"), peer_id]
    return blake3.blake3(b"".join(len(f).to_bytes(8, "little") + f for f in fields)).digest()


def test_batch_seed_is_blake3_of_length_prefixed_fields():
    r, peer = bytes(range(32)), b"\x07" * 32
    assert batch_seed(r, 12, peer) == _expected(r, 12, peer)
    assert len(batch_seed(r, 12, peer)) == 32


def test_batch_seed_changes_with_every_field_and_resists_field_shifting():
    base = batch_seed(b"r" * 32, 3, b"p" * 32)
    assert batch_seed(b"s" * 32, 3, b"p" * 32) != base
    assert batch_seed(b"r" * 32, 4, b"p" * 32) != base
    assert batch_seed(b"r" * 32, 3, b"q" * 32) != base
    # moving bytes between adjacent fields must change the hash (length prefixes)
    assert batch_seed(b"ab", 0, b"c") != batch_seed(b"a", 0, b"bc")


@pytest.mark.parametrize("step", [-1, 2**64, True, 1.0])
def test_batch_seed_rejects_bad_steps(step):
    with pytest.raises(ValueError):
        batch_seed(b"r", step, b"p")


def test_batch_seed_rejects_non_bytes():
    with pytest.raises(TypeError):
        batch_seed("r", 0, b"p")  # type: ignore[arg-type]


def test_generator_from_seed_is_deterministic_and_seed_sensitive():
    a = torch.rand(8, generator=generator_from_seed(b"seed-1"))
    b = torch.rand(8, generator=generator_from_seed(b"seed-1"))
    c = torch.rand(8, generator=generator_from_seed(b"seed-2"))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    with pytest.raises(TypeError):
        generator_from_seed(b"")


def test_sample_indices_distinct_in_range_and_covering():
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(20, dtype=torch.int64)
    for _ in range(400):
        idx = sample_indices(20, 7, g)
        assert idx.shape == (7,) and len(set(idx.tolist())) == 7
        assert int(idx.min()) >= 0 and int(idx.max()) < 20
        counts += torch.bincount(idx, minlength=20)
    # every index is drawn with probability 7/20: 140 expected per index out of 400 draws (sd ≈ 9.5)
    assert int(counts.min()) > 100 and int(counts.max()) < 180
    assert sorted(sample_indices(5, 5, g).tolist()) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        sample_indices(3, 4, g)
