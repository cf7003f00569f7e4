"""Task arithmetic against a literal entry-by-entry sum, plus linearity and purity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coremerge.methods import ta


def literal_ta(tasks: np.ndarray, alpha: float) -> np.ndarray:
    num_tasks, p, q = tasks.shape
    out = np.zeros((p, q))
    for i in range(p):
        for j in range(q):
            out[i, j] = alpha * sum(tasks[t, i, j] for t in range(num_tasks))
    return out


@pytest.mark.parametrize("alpha", [1.0, 0.3, -2.0])
def test_matches_literal_sum(random_tasks, alpha):
    x = random_tasks()
    expected = torch.from_numpy(literal_ta(x.numpy(), alpha))
    torch.testing.assert_close(ta.merge(x, alpha=alpha), expected, rtol=0, atol=1e-12)


def test_is_linear(random_tasks):
    x, y = random_tasks(seed=1), random_tasks(seed=2)
    torch.testing.assert_close(ta.merge(2.0 * x - 0.5 * y), 2.0 * ta.merge(x) - 0.5 * ta.merge(y), rtol=0, atol=1e-12)
    torch.testing.assert_close(ta.merge(x, alpha=0.7), 0.7 * ta.merge(x), rtol=0, atol=1e-12)


def test_one_task_is_alpha_times_itself(random_tasks):
    x = random_tasks(num_tasks=1)
    torch.testing.assert_close(ta.merge(x, alpha=0.4), 0.4 * x[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keeps_dtype_and_does_not_mutate(random_tasks, dtype):
    x = random_tasks(dtype=dtype)
    before = x.clone()
    out = ta.merge(x)
    assert out.dtype == dtype and out.shape == (5, 7)
    assert torch.equal(x, before)


@pytest.mark.parametrize("bad", [torch.zeros(5, 7), torch.zeros(0, 5, 7), torch.zeros(2, 3, 4, dtype=torch.int64)])
def test_rejects_malformed_tasks(bad):
    with pytest.raises(ValueError, match=r"\(T, p, q\)|floating-point"):
        ta.merge(bad)
