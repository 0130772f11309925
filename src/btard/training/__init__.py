"""btard.training: what peers must agree on to train one model together.

A `Task` bundles a seeded model, data with public-seed minibatches (`batch_seed`, `Task.sample_batch`), the
loss, the per-peer batch size, a deterministic flat-tensor optimizer with its LR schedule, and pinned numerics
(`Task.apply_numerics`). Gradients and parameters are flat float32 vectors (`flat_params`, `ParamLayout`).
Get one with `get_task("mnist" | "digits" | "cifar10-resnet18" | "tiny-lm" | "module.path:factory")`.
"""

from btard.training.data import CharTextData, DataSource, TensorClassificationData, TensorSplits
from btard.training.flat import ParamLayout, flat_grad, flat_params, set_flat_params
from btard.training.numerics import Numerics, NumericsState, apply_numerics, pinned_numerics, restore_numerics
from btard.training.optim import (
    AdamConfig,
    ConstantSchedule,
    CosineSchedule,
    FlatAdam,
    FlatOptimizer,
    FlatSGD,
    LRSchedule,
    OptimizerConfig,
    SGDConfig,
    make_optimizer,
)
from btard.training.registry import BUILTIN_TASKS, DEFAULT_TASK, get_task, load_task_factory, task_names
from btard.training.seeds import batch_seed, generator_from_seed
from btard.training.task import Task, TaskSpec, cross_entropy_loss, flip_labels
from btard.training.tasks import CifarConfig, DigitsConfig, MnistConfig, TinyLMConfig

__all__ = [
    "BUILTIN_TASKS",
    "DEFAULT_TASK",
    "AdamConfig",
    "CharTextData",
    "CifarConfig",
    "ConstantSchedule",
    "CosineSchedule",
    "DataSource",
    "DigitsConfig",
    "FlatAdam",
    "FlatOptimizer",
    "FlatSGD",
    "LRSchedule",
    "MnistConfig",
    "Numerics",
    "NumericsState",
    "OptimizerConfig",
    "ParamLayout",
    "SGDConfig",
    "Task",
    "TaskSpec",
    "TensorClassificationData",
    "TensorSplits",
    "TinyLMConfig",
    "apply_numerics",
    "batch_seed",
    "cross_entropy_loss",
    "flat_grad",
    "flat_params",
    "flip_labels",
    "generator_from_seed",
    "get_task",
    "load_task_factory",
    "make_optimizer",
    "pinned_numerics",
    "restore_numerics",
    "set_flat_params",
    "task_names",
]
