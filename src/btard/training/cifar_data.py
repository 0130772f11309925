"""CIFAR-10: the standard ``cifar-10-batches-py`` files when the user has them, else a generated stand-in.

Real files are Python pickles of dicts (``b"data"``: uint8 (N, 3072), ``b"labels"``: N ints); they are read
with the numpy-only unpickler, never with plain ``pickle``. The generated data set has CIFAR's shapes (3×32×32
uint8, 10 classes) and learnable class structure: each class is a fixed mix of low-frequency coloured waves,
each image a random translation and scaling of its class pattern plus a weaker pattern of another class and
pixel noise. It exists so the CIFAR code path runs where no CIFAR-10 copy is available.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from btard.training.data import TensorSplits
from btard.training.safe_pickle import load_numpy_pickle

__all__ = [
    "CIFAR_DIR_NAME",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "SYNTHETIC_MEAN",
    "SYNTHETIC_STD",
    "SyntheticCifarConfig",
    "find_cifar_dir",
    "load_cifar10",
    "read_cifar_batch",
    "synthetic_cifar",
]

CIFAR_DIR_NAME = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # per-channel statistics of the real training set, the usual constants
CIFAR_STD = (0.2470, 0.2435, 0.2616)
SYNTHETIC_MEAN = (0.5, 0.5, 0.5)  # the generated data are centred on grey; measured pixel std ≈ 0.17
SYNTHETIC_STD = (0.17, 0.17, 0.17)
# A real batch file is ~31 MB (10,000 images); refuse anything far larger before unpickling it.
MAX_BATCH_FILE_BYTES = 64 * 1024 * 1024
_CHUNK = 1024  # images generated at once (keeps temporaries in cache)


def find_cifar_dir(data_dir: Path | str) -> Path:
    """``data_dir`` itself if it holds the batch files, else its ``cifar-10-batches-py`` subfolder.

    Raises FileNotFoundError naming the missing files otherwise.
    """
    root = Path(data_dir)
    names = (*TRAIN_FILES, TEST_FILE)
    candidates = (root, root / CIFAR_DIR_NAME)
    for candidate in candidates:
        if all((candidate / name).is_file() for name in names):
            return candidate
    best = max(candidates, key=lambda c: sum((c / n).is_file() for n in names))
    missing = [n for n in names if not (best / n).is_file()]
    raise FileNotFoundError(
        f"no complete CIFAR-10 python batches in {root} or {root / CIFAR_DIR_NAME} ({best} lacks {missing}); "
        "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract it "
        "there"
    )


def read_cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    """One batch file as uint8 images (N, 3, 32, 32) and int64 labels (N,), validated."""
    size = path.stat().st_size
    if size > MAX_BATCH_FILE_BYTES:
        raise ValueError(f"{path}: {size} bytes is too large for a CIFAR-10 batch file")
    with path.open("rb") as f:
        batch = load_numpy_pickle(f, encoding="bytes")
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: not a CIFAR-10 batch (expected a dict)")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not (
        isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
    ):
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape (N, 3072)")
    labels_arr = np.asarray(labels)
    if labels_arr.shape != (data.shape[0],) or not np.issubdtype(labels_arr.dtype, np.integer):
        raise ValueError(f"{path}: 'labels' must be N integers")
    if data.shape[0] and (labels_arr.min() < 0 or labels_arr.max() > 9):
        raise ValueError(f"{path}: labels must be in [0, 10)")
    images = torch.from_numpy(data.copy()).reshape(-1, 3, 32, 32)
    return images, torch.from_numpy(labels_arr.astype(np.int64))


def load_cifar10(data_dir: Path | str) -> TensorSplits:
    """The five training batches (concatenated in order) and the test batch of a CIFAR-10 python dir."""
    root = find_cifar_dir(data_dir)
    train = [read_cifar_batch(root / name) for name in TRAIN_FILES]
    test_x, test_y = read_cifar_batch(root / TEST_FILE)
    return TensorSplits(torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), test_x, test_y)


@dataclass(frozen=True)
class SyntheticCifarConfig:
    """Size, seed and difficulty of the generated CIFAR-shaped data set."""

    train_size: int = 50_000
    test_size: int = 10_000
    seed: int = 0
    num_classes: int = 10
    waves_per_class: int = 4
    max_frequency: int = 3  # waves have integer frequencies in [-3, 3] × [0, 3] cycles per image
    distractor_scale: float = 0.5  # amplitude of another class's pattern mixed into each image
    noise_std: float = 0.12  # std of the uniform per-pixel noise, in units of the [0, 1] pixel range

    def __post_init__(self) -> None:
        if min(self.train_size, self.test_size) < 1 or self.num_classes < 2 or self.waves_per_class < 1:
            raise ValueError("need positive sizes, >= 2 classes and >= 1 wave per class")


def _class_patterns(cfg: SyntheticCifarConfig, g: torch.Generator) -> Tensor:
    """The class patterns (C, 3, 32, 32) in float32: sums of waves with integer frequencies on the 32-grid.

    Every wave value is read from a 32-entry cosine table (rounded to float32, which absorbs last-ulp
    differences between math libraries) and combined with elementwise float ops in a fixed order, so the bits
    do not depend on the machine.
    """
    c, k, f = cfg.num_classes, cfg.waves_per_class, cfg.max_frequency
    fx = torch.randint(-f, f + 1, (c, k), generator=g)
    fy = torch.randint(0, f + 1, (c, k), generator=g)
    fy = torch.where((fx == 0) & (fy == 0), torch.ones_like(fy), fy)  # no constant "wave"
    amps = (2 * torch.rand(c, k, 3, generator=g) - 1) / math.sqrt(k)
    table = torch.tensor([math.cos(2 * math.pi * i / 32) for i in range(32)], dtype=torch.float32)
    grid = torch.arange(32)
    patterns = torch.zeros(c, 3, 32, 32)
    for j in range(k):
        idx = (fx[:, j, None, None] * grid[None, None, :] + fy[:, j, None, None] * grid[None, :, None]) % 32
        patterns += amps[:, j, :, None, None] * table[idx][:, None]
    return patterns


def _shifted(patterns: Tensor, labels: Tensor, g: torch.Generator) -> Tensor:
    """patterns[labels], each rolled by a random (periodic) translation and scaled by a random factor."""
    n = labels.shape[0]
    shift = torch.randint(0, 32, (n, 2), generator=g)
    scale = 0.6 + 0.8 * torch.rand(n, generator=g)
    grid = torch.arange(32)
    rows = (grid[None, :] + shift[:, :1]) % 32
    cols = (grid[None, :] + shift[:, 1:]) % 32
    img = patterns[
        labels[:, None, None, None],
        torch.arange(3)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
    return img * scale[:, None, None, None]


def _generate_split(
    cfg: SyntheticCifarConfig, patterns: Tensor, size: int, g: torch.Generator
) -> tuple[Tensor, Tensor]:
    labels = torch.randint(0, cfg.num_classes, (size,), generator=g)
    others = (labels + torch.randint(1, cfg.num_classes, (size,), generator=g)) % cfg.num_classes
    out = torch.empty(size, 3, 32, 32, dtype=torch.uint8)
    for start in range(0, size, _CHUNK):
        y, other = labels[start : start + _CHUNK], others[start : start + _CHUNK]
        img = _shifted(patterns, y, g) + cfg.distractor_scale * _shifted(patterns, other, g)
        # uniform noise of standard deviation noise_std (uniform bits are exact on every machine, unlike
        # randn)
        noise = (torch.rand(img.shape, generator=g) - 0.5) * (cfg.noise_std * math.sqrt(12))
        img = img.mul_(0.25).add_(0.5).add_(noise).clamp_(0, 1).mul_(255).round_()
        out[start : start + _CHUNK] = img.to(torch.uint8)
    return out, labels


def synthetic_cifar(cfg: SyntheticCifarConfig) -> TensorSplits:
    """The generated data set for ``cfg``: a pure function of the config (same bits on every machine)."""
    g = torch.Generator().manual_seed(cfg.seed)
    patterns = _class_patterns(cfg, g)
    train_x, train_y = _generate_split(cfg, patterns, cfg.train_size, g)
    test_x, test_y = _generate_split(cfg, patterns, cfg.test_size, g)
    return TensorSplits(train_x, train_y, test_x, test_y)
