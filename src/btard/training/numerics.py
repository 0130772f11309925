"""Pinned numerics: the arithmetic settings every peer of a swarm must use (protocol §5).

Nothing here runs at import. `apply_numerics` changes process-wide torch settings, so the caller (a CLI, a
simulator, a test) decides when; `pinned_numerics` does the same for a ``with`` block and restores afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = [
    "Numerics",
    "NumericsState",
    "apply_numerics",
    "current_numerics",
    "pinned_numerics",
    "restore_numerics",
]


@dataclass(frozen=True)
class Numerics:
    """The numerics a task pins.

    dtype: parameter, gradient and activation dtype (float32 by default; the protocol hashes these bytes).
    deterministic: ``torch.use_deterministic_algorithms`` plus cuDNN determinism (no autotuning).
    allow_tf32: TF32 matmul/convolution on GPUs; off, because TF32 and FP32 gradients differ by ~9% (§5).
    num_threads: intra-op CPU threads, or None to leave torch's choice. Different thread counts can change the
        bits of a CPU gradient, so an exact (hash-comparing) swarm should pin it.
    device: where gradients and evaluations are computed.
    """

    dtype: torch.dtype = torch.float32
    deterministic: bool = True
    allow_tf32: bool = False
    num_threads: int | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"numerics dtype must be float32 or float64, got {self.dtype}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")


@dataclass(frozen=True)
class NumericsState:
    """A snapshot of the process-wide torch settings that `apply_numerics` touches."""

    deterministic: bool
    deterministic_warn_only: bool
    cudnn_deterministic: bool
    cudnn_benchmark: bool
    cuda_matmul_tf32: bool
    cudnn_tf32: bool
    matmul_precision: str
    num_threads: int


def current_numerics() -> NumericsState:
    """The current process-wide settings (to restore them later with `restore_numerics`)."""
    return NumericsState(
        deterministic=torch.are_deterministic_algorithms_enabled(),
        deterministic_warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
        cudnn_deterministic=torch.backends.cudnn.deterministic,
        cudnn_benchmark=torch.backends.cudnn.benchmark,
        cuda_matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
        cudnn_tf32=torch.backends.cudnn.allow_tf32,
        matmul_precision=torch.get_float32_matmul_precision(),
        num_threads=torch.get_num_threads(),
    )


def restore_numerics(state: NumericsState) -> None:
    """Put back the settings captured by `current_numerics`."""
    torch.use_deterministic_algorithms(state.deterministic, warn_only=state.deterministic_warn_only)
    torch.backends.cudnn.deterministic = state.cudnn_deterministic
    torch.backends.cudnn.benchmark = state.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = state.cuda_matmul_tf32
    torch.backends.cudnn.allow_tf32 = state.cudnn_tf32
    torch.set_float32_matmul_precision(state.matmul_precision)
    if torch.get_num_threads() != state.num_threads:
        torch.set_num_threads(state.num_threads)


def apply_numerics(numerics: Numerics) -> NumericsState:
    """Apply ``numerics`` process-wide and return the previous settings.

    Guarantees afterwards: deterministic algorithms as requested (an op without a deterministic implementation
    raises instead of silently varying), no cuDNN autotuning, TF32 off unless allowed, float32 matmuls at
    "highest" precision, and the thread count pinned if given. On CUDA, deterministic cuBLAS also needs the
    environment variable ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` set before CUDA starts; that is the launcher's
    job.
    """
    previous = current_numerics()
    torch.use_deterministic_algorithms(numerics.deterministic)
    torch.backends.cudnn.deterministic = numerics.deterministic
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = numerics.allow_tf32
    torch.backends.cudnn.allow_tf32 = numerics.allow_tf32
    torch.set_float32_matmul_precision("high" if numerics.allow_tf32 else "highest")
    if numerics.num_threads is not None and torch.get_num_threads() != numerics.num_threads:
        torch.set_num_threads(numerics.num_threads)
    return previous


@contextlib.contextmanager
def pinned_numerics(numerics: Numerics) -> Iterator[None]:
    """Apply ``numerics`` for the duration of a ``with`` block, then restore the previous settings."""
    previous = apply_numerics(numerics)
    try:
        yield
    finally:
        restore_numerics(previous)
