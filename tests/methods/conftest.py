"""Shared inputs for the merge-method tests: small random task stacks."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor


def _random_tasks(num_tasks: int = 3, p: int = 5, q: int = 7, *, seed: int = 0,
                  dtype: torch.dtype = torch.float64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_tasks, p, q, generator=g, dtype=dtype)  # (T, p, q)


@pytest.fixture
def random_tasks() -> Callable[..., Tensor]:
    """``random_tasks(T=3, p=5, q=7, seed=0, dtype=float64)``: a (T, p, q) standard-normal stack."""
    return _random_tasks


def random_orthogonal(n: int, seed: int) -> Tensor:
    """A random n x n orthogonal matrix (float64)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q  # (n, n)


@pytest.fixture
def orthogonal() -> Callable[[int, int], Tensor]:
    return random_orthogonal
