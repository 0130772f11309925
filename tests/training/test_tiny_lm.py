"""The tiny character-level language model on the bundled public-domain text."""

import pytest
import torch

from btard.training import batch_seed, get_task
from btard.training.tasks import bundled_text


@pytest.fixture(scope="module")
def lm():
    return get_task("tiny-lm", batch_size=4, block_size=32)


def test_bundled_text_is_there():
    text = bundled_text()
    assert len(text) > 5000
    assert "Four score and seven years ago" in text and "When in the Course of human events" in text


def test_batches_are_next_character_windows(lm):
    xb, yb = lm.sample_batch(b"seed")
    assert xb.shape == yb.shape == (4, 32) and xb.dtype == torch.int64
    assert torch.equal(xb[:, 1:], yb[:, :-1])
    assert lm.data.decode(lm.data.encode("Liberty")) == "Liberty"
    assert lm.num_classes is None and "public-domain" in lm.data_source


def test_gradients_vmap_matches_loop(lm):
    x = lm.initial_params()
    seeds = [batch_seed(b"r", 0, bytes([i])) for i in range(4)]
    loop = lm.compute_gradients(x, seeds, method="loop")
    torch.testing.assert_close(lm.compute_gradients(x, seeds), loop, rtol=1e-5, atol=1e-7)
    assert torch.equal(loop[2], lm.compute_gradient(x, seeds[2]))
    with pytest.raises(ValueError, match="not a classification task"):
        lm.compute_gradient(x, seeds[0], label_flip=True)


def test_adam_steps_reduce_the_loss(lm):
    x = lm.initial_params()
    opt = lm.make_optimizer()
    before = lm.evaluate(x, max_examples=8)
    for step in range(25):
        g = lm.compute_gradients(x, [batch_seed(b"r", step, bytes([p])) for p in range(2)]).mean(0)
        x = opt.step(x, g, step)
    after = lm.evaluate(x, max_examples=8)
    assert (
        before["examples"] == 8
        and after["loss"] < before["loss"] - 0.5
        and after["accuracy"] > before["accuracy"]
    )
