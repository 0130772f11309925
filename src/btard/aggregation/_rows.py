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
After each pass, the chunks whose float32 sums of squares overflowed (rows beyond ~1.8e19 per chunk) or fell
below `SQ_LOW` (where squares of float32 entries underflow) are recomputed from x widened to float64 (one
vectorised test per pass, so ordinary inputs pay nothing per chunk): distances and norms are finite and
accurate for any finite float32 entries. Only an update u or iterate that itself overflows float32 (entries
near ±3.4e38 of both signs) is left non-finite, and the callers then redo the rule on a float64 copy of x.
The decisions depend only on the data, so results stay bit-identical across calls and thread counts.
Neither engine modifies x.
"""

from __future__ import annotations

import math
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
# A float32 sum of squares below this may have lost relative precision to underflowed squares (≤ 2⁻¹²⁶ each,
# at most 2¹⁷ of them per chunk: ≤ 2⁻²⁹ relative above 2⁻⁸⁰); such chunks are recomputed in float64.
SQ_LOW = 2.0**-80


def _suspect(parts: np.ndarray) -> np.ndarray:
    """Indices along axis 0 of chunk partial sums of squares that overflowed, are NaN or may have underflowed."""
    ok = (parts >= SQ_LOW) & (parts < math.inf)
    if ok.all():
        return np.empty(0, np.intp)
    return np.nonzero(~ok.reshape(len(ok), -1).all(axis=1))[0]


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
        self._norm_parts = np.empty(len(self._bounds), np.float64)

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

    def _distances_from_parts(self, ref: np.ndarray) -> Tensor:
        """The distances ‖x_i − ref‖ from the chunk partial sums, suspect chunks recomputed in float64."""
        if self.dtype != np.float64:
            for c in _suspect(self._sq_parts):
                s, e = self._bounds[c]
                with np.errstate(all="ignore"):
                    wide = self._x[:, s:e].astype(np.float64) - ref[s:e]
                    self._sq_parts[c] = np.einsum("ij,ij->i", wide, wide)
        return torch.from_numpy(np.sqrt(self._sq_parts.sum(axis=0)))

    def _norm_from_parts(self, v: np.ndarray) -> float:
        """‖v‖ from the chunk partial sums in `_norm_parts`, suspect chunks recomputed in float64."""
        if self.dtype != np.float64:
            for c in _suspect(self._norm_parts):
                s, e = self._bounds[c]
                wide = v[s:e].astype(np.float64)
                self._norm_parts[c] = np.dot(wide, wide)
        return float(np.sqrt(self._norm_parts.sum()))

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
        dists = self._distances_from_parts(out) if distances else None
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
        return self._distances_from_parts(rv)

    def norm(self, v: Tensor) -> float:
        """‖v‖ of a (d,) tensor in x's dtype, float64 accumulation in chunk order (independent of threads)."""
        vv = v.numpy()

        def work(k: int) -> None:
            for c in self._groups[k]:
                s, e = self._bounds[c]
                self._norm_parts[c] = np.dot(vv[s:e], vv[s:e])

        self._run(work)
        return self._norm_from_parts(vv)

    def step(self, r: Tensor, coef: Tensor, r_next: Tensor) -> tuple[float, Tensor, float]:
        """One fused read of x: u = Σ_i coef_i (x_i − r); writes r_next = r + u (in x's dtype) and returns
        (‖u‖, distances ‖x_i − r_next‖ to the stored, rounded r_next, ‖r_next‖). `r` is left unchanged."""
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
                self._norm_parts[c] = np.dot(nv[s:e], nv[s:e])
                np.subtract(self._x[:, s:e], nv[s:e], out=diff)
                self._row_sq(k, c, diff)

        self._run(work)
        if self.dtype != np.float64:
            for c in _suspect(self._step_parts):
                s, e = self._bounds[c]
                with np.errstate(all="ignore"):
                    wide = coef.numpy() @ (self._x[:, s:e].astype(np.float64) - rv[s:e])
                self._step_parts[c] = np.dot(wide, wide)
        step_norm = float(np.sqrt(self._step_parts.sum()))
        return step_norm, self._distances_from_parts(nv), self._norm_from_parts(nv)

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

    def norm(self, v: Tensor) -> float:
        """See `CpuRows.norm`."""
        return float(torch.linalg.vector_norm(v, dtype=torch.float64))

    def step(self, r: Tensor, coef: Tensor, r_next: Tensor) -> tuple[float, Tensor, float]:
        """See `CpuRows.step`."""
        torch.sub(self._x, r, out=self._diff)
        u = coef.to(self._x.dtype) @ self._diff
        torch.add(r, u, out=r_next)
        step_norm = float(torch.linalg.vector_norm(u, dtype=torch.float64))
        return step_norm, self.distances(r_next), self.norm(r_next)


def sq_distances_from_gram(gram: Tensor) -> Tensor:
    """‖x_i − x_j‖² = G_ii + G_jj − 2 G_ij, clamped at 0, exactly symmetric, with a zero diagonal."""
    sq = torch.diagonal(gram)
    out = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_(min=0.0)
    out = (out + out.T) / 2.0
    return out.fill_diagonal_(0.0)


def rows_engine(x: Tensor) -> CpuRows | TorchRows:
    """The engine for `x`: `CpuRows` for CPU tensors, `TorchRows` otherwise."""
    return CpuRows(x) if x.device.type == "cpu" else TorchRows(x)
