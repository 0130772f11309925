"""The two pass engines agree, and the CPU engine's results do not depend on its thread count."""

import pytest
import torch

from btard.aggregation._rows import CpuRows, TorchRows


def data(n=16, d=1 << 17, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:5] *= -100.0
    return x


@pytest.fixture(scope="module")
def x():
    return data()


def run_all(engine, x):
    ranks = [7, 8]
    med, sums, dists0 = engine.order_stats(ranks, 0.5, distances=True)
    trimmed, _, _ = engine.order_stats(range(3, 13), 0.1)
    r = x.mean(dim=0)
    dists = engine.distances(r)
    coef = torch.linspace(0.01, 0.1, x.shape[0], dtype=torch.float64)
    r_next = torch.empty_like(r)
    step, dists_next, norm_next = engine.step(r, coef, r_next)
    pairwise = engine.pairwise_sq_distances()
    return med, sums, dists0, trimmed, dists, step, r_next, dists_next, norm_next, pairwise


def test_cpu_engine_is_thread_count_independent(x):
    single = run_all(CpuRows(x, threads=1), x)
    multi_engine = CpuRows(x, threads=2)
    assert len(multi_engine._groups) == 2
    multi = run_all(multi_engine, x)
    for a, b in zip(single, multi):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        else:
            assert a == b


def test_cpu_engine_matches_torch_engine_and_float64_reference(x):
    cpu = run_all(CpuRows(x), x)
    ref = run_all(TorchRows(x), x)
    med, sums, dists0, trimmed, dists, step, r_next, dists_next, norm_next, pairs = cpu
    torch.testing.assert_close(med, ref[0])
    torch.testing.assert_close(med, torch.quantile(x, 0.5, dim=0))
    torch.testing.assert_close(sums, x.double().sum(dim=1), rtol=1e-5, atol=1e-3)  # a finiteness summary
    torch.testing.assert_close(trimmed, torch.sort(x, dim=0).values[3:13].mean(dim=0))
    x64 = x.double()
    torch.testing.assert_close(dists0, (x64 - med.double()).norm(dim=1), rtol=1e-6, atol=0)
    torch.testing.assert_close(dists, (x64 - x.mean(dim=0).double()).norm(dim=1), rtol=1e-6, atol=0)
    coef = torch.linspace(0.01, 0.1, x.shape[0], dtype=torch.float64)
    u = coef @ (x64 - x.mean(dim=0).double())
    assert step == pytest.approx(float(u.norm()), rel=1e-5)
    torch.testing.assert_close(r_next, ref[6])
    torch.testing.assert_close(dists_next, (x64 - r_next.double()).norm(dim=1), rtol=1e-6, atol=0)
    direct = torch.cdist(x64, x64, compute_mode="donot_use_mm_for_euclid_dist").square()
    torch.testing.assert_close(pairs, direct, rtol=1e-10, atol=1e-6)
    torch.testing.assert_close(ref[9], direct, rtol=1e-10, atol=1e-6)
    assert norm_next == pytest.approx(float(r_next.double().norm()), rel=1e-6)
    assert ref[8] == pytest.approx(norm_next, rel=1e-6)
    assert torch.equal(pairs, pairs.T) and bool((pairs.diagonal() == 0).all())


def test_step_leaves_its_inputs_unchanged(x):
    r = x[9].clone()
    before_x, before_r = x.clone(), r.clone()
    CpuRows(x).step(r, torch.full((x.shape[0],), 1 / 16, dtype=torch.float64), torch.empty_like(r))
    assert torch.equal(x, before_x) and torch.equal(r, before_r)


def test_non_contiguous_input():
    base = data(n=9, d=4000, seed=1)
    x = base[:, ::2]
    med, _, dists = CpuRows(x).order_stats([4], 1.0, distances=True)
    torch.testing.assert_close(med, torch.median(x, dim=0).values)
    torch.testing.assert_close(dists, (x.double() - med.double()).norm(dim=1), rtol=1e-6, atol=0)
