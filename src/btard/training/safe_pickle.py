"""A restricted unpickler for the numpy-array pickles of classic data sets (MNIST's mnist.pkl.gz, CIFAR-10's
python batches).

It resolves only the few globals needed to rebuild numpy arrays; any other global (``os.system``,
``builtins.eval``, ...) raises `UnsafePickleError`, so a crafted file cannot run code. Use it only for local
data files the user chose; never for peer data (peer messages are msgpack, protocol §6).
"""

from __future__ import annotations

import io
import pickle
from typing import IO, Any

import numpy as np

__all__ = ["UnsafePickleError", "load_numpy_pickle"]


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asked for a global outside the numpy-array allow-list."""


def _numpy_internals() -> tuple[Any, Any]:
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    return multiarray, numeric


def _allowed() -> dict[tuple[str, str], Any]:
    multiarray, numeric = _numpy_internals()
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,  # Python 3 writes bytes this way under protocol 2
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"unexpected encoding {encoding!r} in _codecs.encode")
    return text.encode("latin1")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], *, encoding: str) -> None:
        super().__init__(file, encoding=encoding)
        self._allowed = _allowed()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refusing to load global {module}.{name} from a data pickle") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("persistent ids are not allowed in a data pickle")


def load_numpy_pickle(file: IO[bytes] | bytes, *, encoding: str = "bytes") -> Any:
    """Unpickle ``file`` allowing only builtin containers/scalars and numpy arrays, dtypes and scalars.

    ``encoding`` decodes Python 2 ``str`` objects: "bytes" keeps them as bytes (CIFAR's dict keys), "latin1"
    is what numpy arrays pickled by Python 2 need when strings should become ``str`` (MNIST).
    """
    stream = io.BytesIO(file) if isinstance(file, bytes) else file
    return _NumpyOnlyUnpickler(stream, encoding=encoding).load()
