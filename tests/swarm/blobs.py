"""A tiny generated task for swarm tests: 10 Gaussian blobs in 64 dimensions and a small MLP.

It needs neither sklearn nor data files, so each of the ten-odd peer processes of a test starts ~1 s faster
than with the digits task. Peers load it by path: ``--task tests.swarm.blobs:blobs_task``.
"""

from __future__ import annotations

import torch

from btard.training import SGDConfig, Task, TaskSpec, TensorClassificationData, TensorSplits
from btard.training.models import DigitsMLP

TASK = "tests.swarm.blobs:blobs_task"


def _blobs(seed: int = 0, train: int = 2000, test: int = 500) -> TensorSplits:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(10, 64, generator=g) * 1.5
    y = torch.randint(0, 10, (train + test,), generator=g)
    x = centers[y] + torch.randn(train + test, 64, generator=g)
    return TensorSplits(x[:train], y[:train], x[train:], y[train:])


def blobs_task(hidden: int = 32, batch_size: int = 16) -> Task:
    data = TensorClassificationData(
        _blobs, num_classes=10, description="generated Gaussian blobs (test task)"
    )
    spec = TaskSpec(name="blobs", batch_size=batch_size, optimizer=SGDConfig(0.1, 0.9), eval_batch_size=500)
    return Task(spec, lambda: DigitsMLP(hidden=hidden), data)
