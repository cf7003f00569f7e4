"""CART against a literal numpy float64 implementation and the Core Space paper's code (its rank
rule and defaults), plus its identities."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coremerge.methods import cart

import reference_code  # tests/methods/reference_code.py: the Core Space paper's code, re-read


def literal_cart(tasks: np.ndarray, alpha: float, rank: int, lam: float) -> np.ndarray:
    num_tasks, p, q = tasks.shape
    mean = np.zeros((p, q))
    for i in range(p):
        for j in range(q):
            mean[i, j] = sum(tasks[t, i, j] for t in range(num_tasks)) / num_tasks
    low_rank_sum = np.zeros((p, q))
    for t in range(num_tasks):
        u, s, vh = np.linalg.svd(tasks[t] - mean, full_matrices=False)
        low_rank_sum += sum(s[i] * np.outer(u[:, i], vh[i]) for i in range(rank))
    return alpha * (mean + lam * low_rank_sum)


@pytest.mark.parametrize(("density", "rank"), [(0.04, 1), (0.4, 2), (0.6, 3), (0.5, 3), (0.3, 2), (1.0, 5)])
@pytest.mark.parametrize("lam", [0.1, 1.7])
def test_matches_literal(random_tasks, density, rank, lam):
    # rank = ceil(density * min(5, 7)): 0.04 * 5 = 0.2 -> 1, 0.5 * 5 = 2.5 -> 3, 0.3 * 5 = 1.5 -> 2
    x = random_tasks()
    expected = torch.from_numpy(literal_cart(x.numpy(), 0.7, rank, lam))
    torch.testing.assert_close(cart.merge(x, alpha=0.7, density=density, lam=lam), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("num_tasks", "k"), [(4, 32), (8, 80), (3, 10)])
def test_defaults_are_the_reference_codes(num_tasks, k):
    # A core-space sized stack (k x k cores): the defaults give the reference code's default merge.
    x = torch.randn(num_tasks, k, k, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    want = reference_code.cart(x)  # its defaults: rank fraction 0.04, lambda 0.1
    torch.testing.assert_close(cart.merge(x), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(cart.merge(x, alpha=0.3, density=0.16, lam=2.0),
                               0.3 * reference_code.cart(x, 0.16, 2.0), rtol=0, atol=1e-12)


def test_one_task_is_itself(random_tasks):
    x = random_tasks(num_tasks=1)
    torch.testing.assert_close(cart.merge(x, alpha=0.5), 0.5 * x[0], rtol=0, atol=1e-12)


def test_full_rank_or_zero_lambda_is_the_mean(random_tasks):
    # With every component kept, Σ_t (τ_t − mean) = 0; with lam = 0 nothing is added.
    x = random_tasks()
    torch.testing.assert_close(cart.merge(x, alpha=0.9, density=1.0, lam=3.0), 0.9 * x.mean(0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cart.merge(x, alpha=0.9, lam=0.0), 0.9 * x.mean(0), rtol=0, atol=0)


def test_rotations_commute(random_tasks, orthogonal):
    x = random_tasks()
    left, right = orthogonal(5, 5), orthogonal(7, 6)
    torch.testing.assert_close(cart.merge(left @ x @ right, density=0.4), left @ cart.merge(x, density=0.4) @ right,
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keeps_dtype_and_does_not_mutate(random_tasks, dtype):
    x = random_tasks(dtype=dtype)
    before = x.clone()
    assert cart.merge(x).dtype == dtype
    assert torch.equal(x, before)


@pytest.mark.parametrize(("params", "name"), [({"density": 0.0}, "density"), ({"lam": float("nan")}, "lam"),
                                              ({"lam": True}, "lam")])
def test_rejects_bad_hyperparameters(random_tasks, params, name):
    with pytest.raises(ValueError, match=name):
        cart.merge(random_tasks(), **params)
