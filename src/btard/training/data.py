"""Data sources of a task: public-seed minibatch sampling, ordered test/calibration batches.

A data source is loaded lazily on first use and cached in the object (never globally), so building a task is
cheap and two tasks never share hidden state. Sampling draws only from the ``torch.Generator`` it is given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

__all__ = [
    "Augment",
    "CharTextData",
    "DataSource",
    "TensorClassificationData",
    "TensorSplits",
    "sample_indices",
]

Batch = tuple[Tensor, Tensor]
Augment = Callable[[Tensor, torch.Generator], Tensor]


class DataSource(Protocol):
    """What a `Task` needs from its data."""

    @property
    def description(self) -> str:
        """Which data this is (e.g. real MNIST with its checksum, or a generated stand-in)."""
        ...

    @property
    def num_classes(self) -> int | None:
        """C when targets are class labels in [0, C) (label flips allowed), else None."""
        ...

    def train_size(self) -> int: ...

    def sample(self, generator: torch.Generator, batch_size: int) -> Batch:
        """A training minibatch (with augmentation) drawn only from ``generator``."""
        ...

    def train_batches(self, batch_size: int, max_examples: int | None = None) -> Iterator[Batch]:
        """The first ``max_examples`` training examples in order, without augmentation."""
        ...

    def test_batches(self, batch_size: int, max_examples: int | None = None) -> Iterator[Batch]:
        """The first ``max_examples`` test examples in order."""
        ...


@dataclass(frozen=True)
class TensorSplits:
    """Train and test inputs with integer class labels (inputs in any dtype the task's transform accepts)."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor

    def __post_init__(self) -> None:
        for x, y, split in ((self.train_x, self.train_y, "train"), (self.test_x, self.test_y, "test")):
            if x.shape[0] != y.shape[0] or y.dim() != 1 or y.dtype != torch.int64:
                raise ValueError(
                    f"{split}: need N inputs and N int64 labels, got {tuple(x.shape)}, {y.dtype}"
                )
            if x.shape[0] == 0:
                raise ValueError(f"{split} split is empty")


def sample_indices(n: int, k: int, generator: torch.Generator) -> Tensor:
    """k distinct indices in [0, n), a uniformly random subset, drawn from ``generator`` in O(k).

    Floyd's algorithm on one draw of k 63-bit integers (reduced modulo j + 1; the bias, below n / 2**63, is
    negligible). ``torch.randperm(n)`` would cost O(n), milliseconds for n = 50,000.
    """
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    draws = torch.randint(0, 2**63 - 1, (k,), generator=generator).tolist()
    chosen: dict[int, None] = {}  # insertion-ordered set
    for draw, j in zip(draws, range(n - k, n)):
        t = draw % (j + 1)
        chosen[j if t in chosen else t] = None
    return torch.tensor(list(chosen), dtype=torch.int64)


def _ordered(x: Tensor, y: Tensor, batch_size: int, max_examples: int | None) -> Iterator[Batch]:
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    n = x.shape[0] if max_examples is None else min(max_examples, x.shape[0])
    for start in range(0, n, batch_size):
        end = min(start + batch_size, n)
        yield x[start:end], y[start:end]


class TensorClassificationData:
    """In-memory classification data; a batch is ``transform(augment(x[idx], g))``, ``y[idx]``.

    Indices are a uniformly random subset (`sample_indices`, no repeats within a batch) drawn from the
    generator, then ``augment`` (train only) draws from the same generator. ``transform`` maps stored inputs
    (e.g. uint8 pixels) to float model inputs, deterministically.
    """

    def __init__(
        self,
        loader: Callable[[], TensorSplits],
        *,
        num_classes: int,
        description: str | Callable[[], str],
        transform: Callable[[Tensor], Tensor] | None = None,
        augment: Augment | None = None,
    ) -> None:
        self._loader = loader
        self._splits: TensorSplits | None = None
        self._num_classes = num_classes
        self._description = description
        self._transform = transform
        self._augment = augment

    @property
    def description(self) -> str:
        return self._description if isinstance(self._description, str) else self._description()

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def splits(self) -> TensorSplits:
        """The loaded data (loads and validates on first access)."""
        if self._splits is None:
            splits = self._loader()
            for y in (splits.train_y, splits.test_y):
                if int(y.min()) < 0 or int(y.max()) >= self._num_classes:
                    raise ValueError(f"labels must be in [0, {self._num_classes})")
            self._splits = splits
        return self._splits

    def train_size(self) -> int:
        return self.splits.train_x.shape[0]

    def _finish(self, x: Tensor) -> Tensor:
        return self._transform(x) if self._transform is not None else x

    def sample(self, generator: torch.Generator, batch_size: int) -> Batch:
        s = self.splits
        n = s.train_x.shape[0]
        if not 1 <= batch_size <= n:
            raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")
        idx = sample_indices(n, batch_size, generator)
        x = s.train_x[idx]
        if self._augment is not None:
            x = self._augment(x, generator)
        return self._finish(x), s.train_y[idx]

    def train_batches(self, batch_size: int, max_examples: int | None = None) -> Iterator[Batch]:
        for x, y in _ordered(self.splits.train_x, self.splits.train_y, batch_size, max_examples):
            yield self._finish(x), y

    def test_batches(self, batch_size: int, max_examples: int | None = None) -> Iterator[Batch]:
        for x, y in _ordered(self.splits.test_x, self.splits.test_y, batch_size, max_examples):
            yield self._finish(x), y


class CharTextData:
    """Character-level language modelling: inputs are ``block_size`` token ids, targets the next ones.

    The vocabulary is the sorted set of characters of the whole text; the last ``test_fraction`` of the text
    is the test split. A training example starts at a uniformly random offset of the train split; test
    examples are consecutive non-overlapping windows. Targets are next-token ids, not class labels
    (``num_classes`` is None).
    """

    def __init__(self, text: str, *, block_size: int, test_fraction: float, description: str) -> None:
        if block_size < 1 or not 0.0 < test_fraction < 1.0:
            raise ValueError("need block_size >= 1 and 0 < test_fraction < 1")
        self.vocab = "".join(sorted(set(text)))
        self._index = {ch: i for i, ch in enumerate(self.vocab)}
        tokens = torch.tensor([self._index[ch] for ch in text], dtype=torch.int64)
        cut = int(len(tokens) * (1.0 - test_fraction))
        self._train, self._test = tokens[:cut], tokens[cut:]
        if min(len(self._train), len(self._test)) <= block_size:
            raise ValueError(f"text too short for block_size {block_size} ({len(tokens)} characters)")
        self.block_size = block_size
        self._description = description

    @property
    def description(self) -> str:
        return self._description

    @property
    def num_classes(self) -> None:
        return None

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> Tensor:
        """Token ids of ``text`` (raises KeyError for a character outside the vocabulary)."""
        return torch.tensor([self._index[ch] for ch in text], dtype=torch.int64)

    def decode(self, tokens: Tensor) -> str:
        """The text of a 1-D tensor of token ids."""
        return "".join(self.vocab[int(t)] for t in tokens)

    def train_size(self) -> int:
        return len(self._train) - self.block_size

    def sample(self, generator: torch.Generator, batch_size: int) -> Batch:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        starts = torch.randint(0, self.train_size(), (batch_size,), generator=generator)
        return self._windows(self._train, starts)

    def _windows(self, tokens: Tensor, starts: Tensor) -> Batch:
        offsets = starts[:, None] + torch.arange(self.block_size + 1)[None, :]
        w = tokens[offsets]
        return w[:, :-1], w[:, 1:]

    def _ordered_windows(self, tokens: Tensor, batch_size: int, max_examples: int | None) -> Iterator[Batch]:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        starts = torch.arange(0, len(tokens) - self.block_size, self.block_size)
        if max_examples is not None:
            starts = starts[:max_examples]
        for i in range(0, len(starts), batch_size):
            yield self._windows(tokens, starts[i : i + batch_size])

    def train_batches(self, batch_size: int, max_examples: int | None = None) -> Iterator[Batch]:
        return self._ordered_windows(self._train, batch_size, max_examples)

    def test_batches(self, batch_size: int, max_examples: int | None = None) -> Iterator[Batch]:
        return self._ordered_windows(self._test, batch_size, max_examples)
