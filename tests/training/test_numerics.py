"""Pinned numerics are applied only on request and can be restored."""

import torch

from btard.training import Numerics, get_task, pinned_numerics
from btard.training.numerics import current_numerics


def test_pinned_numerics_applies_and_restores():
    before = current_numerics()
    with pinned_numerics(Numerics(deterministic=True, num_threads=1)):
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "highest"
        assert not torch.backends.cudnn.benchmark
        assert torch.get_num_threads() == 1
    assert current_numerics() == before


def test_building_a_task_does_not_touch_process_settings():
    before = current_numerics()
    rng = torch.get_rng_state()
    get_task("digits")
    assert current_numerics() == before
    assert torch.equal(torch.get_rng_state(), rng)
