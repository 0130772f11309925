"""CIFAR-10: the cifar-10-batches-py loader (on a fixture written in that format), the generated stand-in,
augmentation, and the paper's ResNet-18.
"""

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from btard.training import batch_seed, get_task
from btard.training.augment import RandomCropFlip
from btard.training.cifar_data import (
    CIFAR_DIR_NAME,
    SyntheticCifarConfig,
    find_cifar_dir,
    load_cifar10,
    read_cifar_batch,
    synthetic_cifar,
)
from btard.training.models import ResNet18
from btard.training.safe_pickle import UnsafePickleError

SMALL = SyntheticCifarConfig(train_size=96, test_size=24, seed=3)


def _write_batch(path, images: np.ndarray, labels: list[int]) -> None:
    # the layout of the real files: a dict with bytes keys, uint8 data (N, 3072), labels as a list of ints
    batch = {
        b"batch_label": b"fixture",
        b"labels": labels,
        b"data": images.reshape(len(labels), 3072),
        b"filenames": [f"img{i}.png".encode() for i in range(len(labels))],
    }
    with path.open("wb") as f:
        pickle.dump(batch, f, protocol=2)


@pytest.fixture()
def cifar_dir(tmp_path):
    root = tmp_path / CIFAR_DIR_NAME
    root.mkdir()
    rng = np.random.default_rng(0)
    expected = []
    for i in range(1, 6):
        images = rng.integers(0, 256, size=(3, 3, 32, 32), dtype=np.uint8)
        labels = [(i + k) % 10 for k in range(3)]
        _write_batch(root / f"data_batch_{i}", images, labels)
        expected.append((images, labels))
    test_images = rng.integers(0, 256, size=(4, 3, 32, 32), dtype=np.uint8)
    _write_batch(root / "test_batch", test_images, [9, 8, 7, 6])
    return tmp_path, expected, test_images


def test_loader_reads_the_standard_format(cifar_dir):
    parent, expected, test_images = cifar_dir
    assert find_cifar_dir(parent) == parent / CIFAR_DIR_NAME == find_cifar_dir(parent / CIFAR_DIR_NAME)
    splits = load_cifar10(parent)
    assert splits.train_x.shape == (15, 3, 32, 32) and splits.train_x.dtype == torch.uint8
    assert torch.equal(splits.train_x, torch.from_numpy(np.concatenate([im for im, _ in expected])))
    assert splits.train_y.tolist() == [lab for _, labels in expected for lab in labels]
    assert torch.equal(splits.test_x, torch.from_numpy(test_images)) and splits.test_y.tolist() == [
        9,
        8,
        7,
        6,
    ]


def test_task_on_real_files_reports_them(cifar_dir):
    parent, _, _ = cifar_dir
    task = get_task("cifar10-resnet18", data_dir=str(parent), bn_calibration_examples=8)
    assert task.data_source.startswith("CIFAR-10 (real") and str(parent) in task.data_source
    x, y = task.sample_batch(b"some seed")
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (8,)


def test_missing_files_and_bad_contents_are_rejected(cifar_dir, tmp_path):
    parent, _, _ = cifar_dir
    (parent / CIFAR_DIR_NAME / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        find_cifar_dir(parent)
    bad = tmp_path / "bad_batch"
    _write_batch(bad, np.zeros((2, 3, 32, 32), np.uint8), [1, 12])
    with pytest.raises(ValueError, match="labels"):
        read_cifar_batch(bad)


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "data_batch_1"
    with path.open("wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(UnsafePickleError, match="refusing to load global"):
        read_cifar_batch(path)
    assert not marker.exists()


def test_synthetic_data_is_deterministic_balanced_and_reported():
    a, b = synthetic_cifar(SMALL), synthetic_cifar(SMALL)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert a.train_x.shape == (96, 3, 32, 32) and a.train_x.dtype == torch.uint8 and a.test_x.shape[0] == 24
    assert not torch.equal(synthetic_cifar(SyntheticCifarConfig(96, 24, seed=4)).train_x, a.train_x)
    assert set(a.train_y.tolist()) == set(range(10))
    assert 100 < a.train_x.float().mean() < 155 and a.train_x.float().std() > 20
    task = get_task("cifar10-resnet18", synthetic=SMALL)
    assert "synthetic" in task.data_source and "NOT CIFAR-10" in task.data_source


def test_synthetic_classes_differ_more_than_images_within_a_class():
    s = synthetic_cifar(SyntheticCifarConfig(train_size=600, test_size=10, seed=0, distractor_scale=0.0))
    # translation-invariant feature: per-channel 2-D power spectrum; class means must be far apart
    spec = torch.fft.fft2(s.train_x.float() / 255).abs()[:, :, :4, :4].reshape(600, -1)
    means = torch.stack([spec[s.train_y == c].mean(0) for c in range(10)])
    within = torch.stack([(spec[s.train_y == c] - means[c]).norm(dim=1).mean() for c in range(10)]).mean()
    between = torch.cdist(means, means)[~torch.eye(10, dtype=torch.bool)].mean()
    assert between > 2 * within


def test_random_crop_flip_matches_a_per_image_reference():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    out = RandomCropFlip(padding=2)(x, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # redraw in the documented order: rows, columns, flips
    dy, dx = torch.randint(0, 5, (2,), generator=g), torch.randint(0, 5, (2,), generator=g)
    flips = torch.randint(0, 2, (2,), generator=g)
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(2):
        ref = padded[i, :, dy[i] : dy[i] + 6, dx[i] : dx[i] + 6]
        assert torch.equal(out[i], ref.flip(-1) if flips[i] else ref)
    assert torch.equal(RandomCropFlip(padding=0, flip=False)(x, g), x)


def test_resnet18_has_the_papers_parameter_count():
    assert sum(p.numel() for p in ResNet18().parameters()) == 11_173_962


def test_cifar_task_gradient_and_evaluate():
    task = get_task(
        "cifar10-resnet18", synthetic=SMALL, batch_size=4, bn_calibration_examples=16, eval_batch_size=8
    )
    assert task.dim == 11_173_962 and task.has_batchnorm and not task.uses_vmap
    opt = task.spec.optimizer
    assert (opt.lr, opt.momentum, opt.nesterov, opt.weight_decay) == (0.01, 0.9, True, 5e-4)
    assert task.make_optimizer().lr(25_000) == 0.0
    x = task.initial_params()
    seeds = [batch_seed(b"r", 1, b"a"), batch_seed(b"r", 1, b"b")]
    xb, _ = task.sample_batch(seeds[0])
    xb2, _ = task.sample_batch(seeds[0])
    assert xb.shape == (4, 3, 32, 32) and torch.equal(xb, xb2)
    grads = task.compute_gradients(x, seeds)  # batch-norm: the per-peer loop
    assert torch.equal(grads[0], task.compute_gradient(x, seeds[0]))
    assert torch.isfinite(grads).all() and not torch.equal(grads[0], grads[1])
    with pytest.raises(ValueError):
        task.compute_gradients(x, seeds, method="vmap")
    m1 = task.evaluate(x, max_examples=8)
    assert m1["examples"] == 8 and m1 == task.evaluate(x, max_examples=8)
