"""The task registry: built-in names, config overrides, and user tasks given as "module.path:factory"."""

import textwrap

import pytest
from torch import nn

from btard.training import BUILTIN_TASKS, DEFAULT_TASK, SGDConfig, Task, TaskSpec, get_task, task_names


def test_builtin_names_and_default():
    assert task_names() == ["mnist", "digits", "cifar10-resnet18", "tiny-lm"]
    assert DEFAULT_TASK == "mnist" and set(BUILTIN_TASKS) == set(task_names())


def test_overrides_reach_the_config():
    task = get_task("digits", batch_size=5, lr=0.3)
    assert task.batch_size == 5 and task.spec.optimizer.lr == 0.3
    assert task.sample_batch(b"x")[0].shape == (5, 64)
    with pytest.raises(TypeError, match="unknown DigitsConfig option"):
        get_task("digits", batchsize=5)


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown task"):
        get_task("imagenet")
    with pytest.raises(ValueError, match="module.path:factory"):
        get_task("somemodule:")


def test_user_task_from_module_path(tmp_path, monkeypatch):
    (tmp_path / "my_btard_task.py").write_text(
        textwrap.dedent(
            """
            from btard.training import DigitsConfig, get_task

            def make(scale=1, **overrides):
                return get_task("digits", hidden=8 * scale, **overrides)

            class Holder:
                make = staticmethod(make)

            def not_a_task():
                return 42
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    task = get_task("my_btard_task:make", scale=2, batch_size=3)
    assert isinstance(task, Task) and task.batch_size == 3 and task.dim == 64 * 16 + 16 + 16 * 10 + 10
    assert get_task("my_btard_task:Holder.make").dim == 64 * 8 + 8 + 8 * 10 + 10
    with pytest.raises(TypeError, match="not a btard.training.Task"):
        get_task("my_btard_task:not_a_task")
    with pytest.raises(ValueError, match="no attribute"):
        get_task("my_btard_task:missing")


def test_models_with_dropout_are_refused():
    digits = get_task("digits")
    spec = TaskSpec(name="dropout", batch_size=4, optimizer=SGDConfig(0.1))
    with pytest.raises(ValueError, match="dropout"):
        Task(spec, lambda: nn.Sequential(nn.Linear(64, 10), nn.Dropout(0.5)), digits.data)
    assert Task(spec, lambda: nn.Sequential(nn.Linear(64, 10), nn.Dropout(0.0)), digits.data).dim == 650
