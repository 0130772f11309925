"""Look tasks up by name: the built-ins, or a user's factory given as ``"module.path:factory"``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from btard.training.task import Task
from btard.training.tasks import cifar10_resnet18_task, digits_task, mnist_task, tiny_lm_task

__all__ = ["BUILTIN_TASKS", "DEFAULT_TASK", "TaskFactory", "get_task", "load_task_factory", "task_names"]

TaskFactory = Callable[..., Task]

BUILTIN_TASKS: dict[str, TaskFactory] = {
    "mnist": mnist_task,
    "digits": digits_task,
    "cifar10-resnet18": cifar10_resnet18_task,
    "tiny-lm": tiny_lm_task,
}
DEFAULT_TASK = "mnist"


def task_names() -> list[str]:
    """The names of the built-in tasks."""
    return list(BUILTIN_TASKS)


def load_task_factory(spec: str) -> TaskFactory:
    """The callable named by ``"package.module:attr"`` (``attr`` may be dotted), imported now.

    This imports and runs the user's code: only name modules you trust.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'module.path:factory', got {spec!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise TypeError(f"{spec!r} is not callable")
    return obj


def get_task(name: str = DEFAULT_TASK, **overrides: Any) -> Task:
    """Build the task ``name`` (a built-in name or ``"module.path:factory"``) with config ``overrides``.

    A user factory is called with the overrides as keyword arguments and must return a `Task`.
    """
    if name in BUILTIN_TASKS:
        factory = BUILTIN_TASKS[name]
    elif ":" in name:
        factory = load_task_factory(name)
    else:
        raise ValueError(f"unknown task {name!r}; built-ins: {task_names()}, or give 'module.path:factory'")
    task = factory(**overrides)
    if not isinstance(task, Task):
        raise TypeError(f"task factory {name!r} returned {type(task).__name__}, not a btard.training.Task")
    return task
