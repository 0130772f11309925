"""Passes over the rows of an (n, d) matrix, the kernels behind the rules: order statistics, distances to a
point, and one fused fixed-point step.

Two engines with one interface, chosen by `rows_engine`:

* `CpuRows` (CPU tensors): numpy kernels over cache-sized column chunks (16 rows × 8192 float32 = 512 KiB fits
  the L2 cache), with preallocated buffers and BLAS for the weighted sums and row dot products. Chunk ranges
  are split across `torch.get_num_threads()` Python threads (numpy and BLAS release the GIL), so a pass is
  parallel without a barrier per op. Per-chunk partial sums are stored and reduced in chunk order, so results
  do not depend on the number of threads.
* `TorchRows` (any device, e.g. CUDA): the same passes as whole-matrix torch ops on one preallocated buffer.

Differences x_i − r are formed in the input dtype; sums of squares are accumulated across chunks in float64,
so a distance carries the float error of one chunk (~1e-6 relative for float32), not of the whole vector.
Neither engine modifies x.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from btard.aggregation._sortnet import selection_network

# Elements per chunk: 512 KiB of float32, so a chunk stays in a core's L2 cache (1 MiB on the reference CPU)
# across the several ops that touch it, while each op still has thousands of elements to amortise its dispatch.
CHUNK_ELEMENTS = 1 << 17
# Below this many elements per thread a pass takes well under a millisecond: starting threads would cost more.
MIN_ELEMENTS_PER_THREAD = 1 << 20


class CpuRows:
    """Chunked, multi-threaded numpy passes over the rows of a CPU tensor `x` (n, d)."""

    def __init__(self, x: Tensor, threads: int | None = None, chunk_elements: int = CHUNK_ELEMENTS) -> None:
        self.n, self.d = x.shape
        self._x = x.detach().numpy()
        self.dtype = self._x.dtype
        cols = max(1, min(self.d, chunk_elements // self.n))
        self._bounds = [(s, min(s + cols, self.d)) for s in range(0, self.d, cols)]
        wanted = torch.get_num_threads() if threads is None else threads
        k = max(1, min(wanted, len(self._bounds), (self.n * self.d) // MIN_ELEMENTS_PER_THREAD))
        self._groups = [g.tolist() for g in np.array_split(np.arange(len(self._bounds)), k)]
        self._buf = [np.empty((self.n + 1, cols), self.dtype) for _ in range(k)]
        self._vec = [np.empty(cols, self.dtype) for _ in range(k)]
        self._dots = [np.empty((self.n, 1, 1), self.dtype) for _ in range(k)]
        self._sq_parts = np.empty((len(self._bounds), self.n), np.float64)
        self._step_parts = np.empty(len(self._bounds), np.float64)

    def _run(self, work: Callable[[int], None]) -> None:
        """Run work(k) for every thread group k; NaN/Inf are reported by the callers, not as numpy warnings."""

        def quiet(k: int) -> None:
            with np.errstate(all="ignore"):
                work(k)

        if len(self._groups) == 1:
            quiet(0)
            return
        with ThreadPoolExecutor(max_workers=len(self._groups)) as pool:
            for future in [pool.submit(quiet, k) for k in range(len(self._groups))]:
                future.result()

    def _row_sq(self, k: int, c: int, diff: np.ndarray) -> None:
        """Store the squared norms of the rows of `diff` as chunk c's partial sums (BLAS dot per row)."""
        dots = self._dots[k]
        np.matmul(diff[:, None, :], diff[:, :, None], out=dots)
        self._sq_parts[c] = dots[:, 0, 0]

    def _distances_from_parts(self) -> Tensor:
        return torch.from_numpy(np.sqrt(self._sq_parts.sum(axis=0)))

    def order_stats(
        self, ranks: Sequence[int], scale: float, *, distances: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Column-wise `scale · Σ_{r ∈ ranks} x_(r)` (x_(r): r-th smallest, 0-based; summed in rank order in
        x's dtype, so independent of the row order), float64 row sums of x (a finiteness summary: a row with
        NaN/Inf has a non-finite sum), and, if asked, the distances ‖x_i − value‖ from the same read of x."""
        n = self.n
        network = selection_network(n, ranks)
        rank_list = sorted(set(ranks))
        out = np.empty(self.d, self.dtype)
        sums = np.empty((len(self._bounds), n), np.float64)

        def work(k: int) -> None:
            buf = self._buf[k]
            for c in self._groups[k]:
                s, e = self._bounds[c]
                chunk = buf[:, : e - s]
                rows = chunk[:n]
                np.copyto(rows, self._x[:, s:e])
                sums[c] = rows.sum(axis=1)
                wires = list(rows)
                spare = chunk[n]
                for i, j in network:
                    lo, hi = wires[i], wires[j]
                    np.minimum(lo, hi, out=spare)
                    np.maximum(lo, hi, out=hi)
                    wires[i], spare = spare, lo
                target = out[s:e]
                np.copyto(target, wires[rank_list[0]])
                for r in rank_list[1:]:
                    np.add(target, wires[r], out=target)
                if scale != 1.0:
                    np.multiply(target, self.dtype.type(scale), out=target)
                if distances:
                    np.subtract(self._x[:, s:e], target, out=rows)
                    self._row_sq(k, c, rows)

        self._run(work)
        dists = self._distances_from_parts() if distances else None
        return torch.from_numpy(out), torch.from_numpy(sums.sum(axis=0)), dists

    def distances(self, r: Tensor) -> Tensor:
        """‖x_i − r‖ for every row, float64 (n,). One read of x."""
        rv = r.numpy()

        def work(k: int) -> None:
            buf = self._buf[k]
            for c in self._groups[k]:
                s, e = self._bounds[c]
                diff = buf[: self.n, : e - s]
                np.subtract(self._x[:, s:e], rv[s:e], out=diff)
                self._row_sq(k, c, diff)

        self._run(work)
        return self._distances_from_parts()

    def step(self, r: Tensor, coef: Tensor, r_next: Tensor) -> tuple[float, Tensor]:
        """One fused read of x: u = Σ_i coef_i (x_i − r); writes r_next = r + u (in x's dtype) and returns
        (‖u‖, distances ‖x_i − r_next‖ to the stored, rounded r_next). `r` is left unchanged."""
        rv, nv = r.numpy(), r_next.numpy()
        cv = coef.numpy().astype(self.dtype)

        def work(k: int) -> None:
            buf, vec = self._buf[k], self._vec[k]
            for c in self._groups[k]:
                s, e = self._bounds[c]
                diff, u = buf[: self.n, : e - s], vec[: e - s]
                np.subtract(self._x[:, s:e], rv[s:e], out=diff)
                np.matmul(cv, diff, out=u)
                self._step_parts[c] = np.dot(u, u)
                np.add(rv[s:e], u, out=nv[s:e])
                np.subtract(self._x[:, s:e], nv[s:e], out=diff)
                self._row_sq(k, c, diff)

        self._run(work)
        return float(np.sqrt(self._step_parts.sum())), self._distances_from_parts()

    def pairwise_sq_distances(self) -> Tensor:
        """(n, n) float64 matrix of ‖x_i − x_j‖² (see `sq_distances_from_gram`). Each chunk is centred on its own
        column means, which leaves the distances unchanged, and its Gram matrix is formed in float64 (exact
        products of the inputs), so cancellation costs ~1e-16 relative to the centred norms, not to ‖x‖²."""
        n, cols = self.n, self._buf[0].shape[1]
        parts = np.empty((len(self._bounds), n, n), np.float64)
        wide = [np.empty((n, cols), np.float64) for _ in self._groups]

        def work(k: int) -> None:
            for c in self._groups[k]:
                s, e = self._bounds[c]
                chunk = wide[k][:, : e - s]
                np.copyto(chunk, self._x[:, s:e])
                chunk -= chunk.mean(axis=0)
                np.matmul(chunk, chunk.T, out=parts[c])

        self._run(work)
        return sq_distances_from_gram(torch.from_numpy(parts.sum(axis=0)))


class TorchRows:
    """The same passes as whole-matrix torch ops (for non-CPU devices), with one preallocated (n, d) buffer."""

    def __init__(self, x: Tensor) -> None:
        self.n, self.d = x.shape
        self._x = x.detach()
        self._diff = torch.empty_like(self._x)

    def order_stats(
        self, ranks: Sequence[int], scale: float, *, distances: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """See `CpuRows.order_stats`."""
        ordered = torch.sort(self._x, dim=0).values
        rank_list = sorted(set(ranks))
        out = ordered[rank_list[0]].clone()
        for r in rank_list[1:]:
            out.add_(ordered[r])
        if scale != 1.0:
            out.mul_(scale)
        del ordered
        sums = self._x.sum(dim=1, dtype=torch.float64)
        return out, sums, self.distances(out) if distances else None

    def distances(self, r: Tensor) -> Tensor:
        """See `CpuRows.distances`."""
        torch.sub(self._x, r, out=self._diff)
        return torch.linalg.vector_norm(self._diff, dim=1, dtype=torch.float64)

    def pairwise_sq_distances(self) -> Tensor:
        """See `CpuRows.pairwise_sq_distances` (one float64 copy of x, centred on its column means)."""
        centred = self._x.to(torch.float64)
        centred -= centred.mean(dim=0)
        return sq_distances_from_gram(centred @ centred.T)

    def step(self, r: Tensor, coef: Tensor, r_next: Tensor) -> tuple[float, Tensor]:
        """See `CpuRows.step`."""
        torch.sub(self._x, r, out=self._diff)
        u = coef.to(self._x.dtype) @ self._diff
        torch.add(r, u, out=r_next)
        return float(torch.linalg.vector_norm(u, dtype=torch.float64)), self.distances(r_next)


def sq_distances_from_gram(gram: Tensor) -> Tensor:
    """‖x_i − x_j‖² = G_ii + G_jj − 2 G_ij, clamped at 0, exactly symmetric, with a zero diagonal."""
    sq = torch.diagonal(gram)
    out = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_(min=0.0)
    out = (out + out.T) / 2.0
    return out.fill_diagonal_(0.0)


def rows_engine(x: Tensor) -> CpuRows | TorchRows:
    """The engine for `x`: `CpuRows` for CPU tensors, `TorchRows` otherwise."""
    return CpuRows(x) if x.device.type == "cpu" else TorchRows(x)
