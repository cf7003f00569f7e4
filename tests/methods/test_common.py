"""The shared helpers: polar factor, numerical rank, top-k masks, best low-rank approximation."""

from __future__ import annotations

import pytest
import torch

from coremerge.methods import _common


def test_polar_of_orthonormal_columns_is_itself(orthogonal):
    q = orthogonal(6, 0)[:, :4]  # (6, 4) orthonormal columns
    torch.testing.assert_close(_common.polar(q), q, rtol=0, atol=1e-13)


def test_polar_is_orthonormal_and_the_nearest_such_matrix(random_tasks, orthogonal):
    x = random_tasks(1, 6, 4)[0]
    w = _common.polar(x)  # (6, 4)
    torch.testing.assert_close(w.T @ w, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-13)
    for seed in range(5):  # no other matrix with orthonormal columns is closer (Fan–Hoffman)
        other = orthogonal(6, seed)[:, :4]
        assert (x - w).norm() <= (x - other).norm()
    wide = _common.polar(x.T)  # (4, 6): orthonormal rows
    torch.testing.assert_close(wide, w.T, rtol=0, atol=1e-13)


def test_rank_tolerance_separates_float_noise_from_signal():
    x = torch.outer(torch.arange(1.0, 7.0), torch.ones(5)).double()  # rank 1
    s = torch.linalg.svdvals(x)
    mask = _common.nonzero_spectrum(s, x.shape)
    assert mask.tolist() == [True, False, False, False, False]
    assert _common.rank_tolerance(s, x.shape) == pytest.approx(float(s[0]) * 6 * torch.finfo(torch.float64).eps)
    assert _common.rank_tolerance(torch.zeros(0), (3, 4)) == 0.0


@pytest.mark.parametrize(("density", "size", "expected"), [
    (0.7, 35, 25), (0.04, 35, 2), (1.0, 35, 35), (0.5, 5, 3), (0.5, 4, 3), (0.001, 10, 1), (0.999, 10, 10),
    (0.29, 100, 29),  # 0.29 * 100 = 28.999999999999996 in floating point, as in the reference code
    (0.3, 100, 31),   # an exact product still keeps one more than the fraction
])
def test_keep_count_is_the_reference_codes(density, size, expected):
    # int(density * size) + 1, at most size: the count of topk_values_mask in the TIES and Core Space
    # papers' code (it keeps the entries at or above the (size - int(density * size))-th smallest).
    assert _common.keep_count(density, size) == expected
    assert expected == min(size, int(density * size) + 1)


def test_topk_mask_never_keeps_zeros():
    x = torch.tensor([[[0.0, 0.0, 3.0, 0.0]], [[1.0, -2.0, 0.0, 0.5]]], dtype=torch.float64)
    mask = _common.topk_mask(x, 0.5)  # k = int(0.5 * 4) + 1 = 3 per task
    assert mask.tolist() == [[[False, False, True, False]], [[True, True, False, True]]]


def test_low_rank_is_the_best_approximation(random_tasks):
    x = random_tasks(2, 6, 5)
    approx = _common.low_rank(x, 2)  # (2, 6, 5)
    for t in range(2):
        assert int(torch.linalg.matrix_rank(approx[t])) == 2
        s = torch.linalg.svdvals(x[t])
        torch.testing.assert_close((x[t] - approx[t]).norm(), s[2:].norm(), rtol=1e-12, atol=1e-12)


def test_disjoint_mean_is_pure():
    x = torch.tensor([[[1.0, -3.0]], [[2.0, 1.0]]], dtype=torch.float64)
    keep = x != 0
    before = x.clone()
    torch.testing.assert_close(_common.disjoint_mean(x, keep), torch.tensor([[1.5, -3.0]], dtype=torch.float64))
    assert torch.equal(x, before)


def test_generator_must_be_an_explicit_cpu_generator():
    with pytest.raises(ValueError, match="generator"):
        _common.check_generator(None, "dare")
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        _common.check_generator(0, "dare")


@pytest.mark.parametrize("failures", [1, 2])
def test_svd_falls_back_to_float64_when_lapack_does_not_converge(monkeypatch, failures):
    # LAPACK's float32 gesdd gave up on a full-space Iso-CTS matrix of the accuracy benchmark
    # (many repeated singular values). The helper must retry, in float64, then on the transpose,
    # and still return an exact float32 SVD.
    from coremerge import linalg

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 6, generator=g)  # batched, as the methods call it
    real_svd, calls = torch.linalg.svd, []

    def flaky(a, full_matrices=True):
        calls.append(a.dtype)
        if len(calls) <= failures:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real_svd(a, full_matrices=full_matrices)

    monkeypatch.setattr(linalg.torch.linalg, "svd", flaky)
    u, s, vh = _common.svd(x)
    assert calls == [torch.float32, torch.float64, torch.float64][: failures + 1]
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    assert (u.shape, s.shape, vh.shape) == ((2, 9, 6), (2, 6), (2, 6, 6))
    torch.testing.assert_close((u * s[..., None, :]) @ vh, x, rtol=0, atol=1e-5)
    eye = torch.eye(6).expand(2, 6, 6)
    torch.testing.assert_close(u.mT @ u, eye, rtol=0, atol=1e-5)
    torch.testing.assert_close(vh @ vh.mT, eye, rtol=0, atol=1e-5)
    assert bool((s[..., :-1] >= s[..., 1:]).all())
