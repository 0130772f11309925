"""Shared fixtures of the training tests."""

import pytest

from btard.training import Numerics, pinned_numerics


@pytest.fixture(autouse=True)
def _pinned_one_thread():
    """Run each test under pinned numerics with one intra-op thread, restoring the settings afterwards.

    One thread keeps timings stable on a shared 2-core machine: with two threads and other processes running,
    torch's CPU kernels can slow down tenfold.
    """
    with pinned_numerics(Numerics(num_threads=1)):
        yield
