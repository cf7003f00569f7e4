"""Helpers shared by the merge methods: input checks, SVD pieces, masks and the TIES rule.

Every function here is pure (inputs are never modified) and computes in the dtype and on
the device of its tensor arguments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

import torch
from torch import Tensor

from coremerge.linalg import one_thread_if_small, rank_tolerance  # noqa: F401  (re-exported)
from coremerge.linalg import svd as linalg_svd

# ----------------------------------------------------------------------------- input checks


def check_tasks(tasks: object, method: str) -> tuple[int, int, int]:
    """Check that ``tasks`` is a non-empty (T, p, q) floating-point stack; return (T, p, q)."""
    if not isinstance(tasks, Tensor):
        raise ValueError(f"{method}: tasks must be a torch.Tensor of shape (T, p, q), got {type(tasks).__name__}")
    if tasks.ndim != 3 or 0 in tasks.shape:
        raise ValueError(f"{method}: tasks must have shape (T, p, q) with T, p, q >= 1, got {tuple(tasks.shape)}")
    if not tasks.is_floating_point():
        raise ValueError(f"{method}: tasks must be a floating-point tensor (float32 or float64), got {tasks.dtype}")
    num_tasks, p, q = tasks.shape
    return num_tasks, p, q


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_density(value: object, name: str = "density") -> float:
    """A fraction kept: a number in (0, 1]."""
    x = _real(name, value)
    if not 0.0 < x <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1] (the fraction kept), got {value!r}")
    return x


def check_common_fraction(value: object, name: str = "common_fraction") -> float:
    """The share of the spectrum given to the common subspace: a number in [0, 1]."""
    x = _real(name, value)
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return x


def check_finite(value: object, name: str) -> float:
    """Any finite number (bools are refused)."""
    return _real(name, value)


def check_generator(generator: object, method: str) -> torch.Generator:
    """The explicit CPU generator that random methods draw their masks from."""
    if generator is None:
        raise ValueError(f"{method} is random: pass generator=torch.Generator().manual_seed(seed) "
                         "(randomness must be explicit)")
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(f"{method}: generator must be a CPU torch.Generator (masks are drawn on the CPU so "
                         f"every device gets the same ones), got {generator!r}")
    return generator


def check_task_ranks(task_ranks: Sequence[int], num_tasks: int, method: str) -> tuple[int, ...]:
    """One positive integer rank per task."""
    ranks = tuple(task_ranks)
    if len(ranks) != num_tasks:
        raise ValueError(f"{method}: got {len(ranks)} task_ranks for {num_tasks} tasks; give one rank per task")
    if not all(isinstance(r, Integral) and not isinstance(r, bool) and r >= 1 for r in ranks):
        raise ValueError(f"{method}: task_ranks must be positive integers, got {list(ranks)}")
    return tuple(int(r) for r in ranks)


# ----------------------------------------------------------------------------- linear algebra


def svd(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``x = u @ diag(s) @ vh`` (batched over leading dims), singular values descending.

    ``coremerge.linalg.svd``: falls back to float64 where LAPACK's float32 SVD does not converge.
    """
    return linalg_svd(x)  # (..., p, d), (..., d), (..., d, q)


def nonzero_spectrum(s: Tensor, shape: Sequence[int]) -> Tensor:
    """Boolean mask of the singular values above the numerical-rank tolerance."""
    return s > rank_tolerance(s, shape)  # (d,)


def polar(x: Tensor) -> Tensor:
    """Polar (orthogonal) factor of ``x``: with the thin SVD ``x = P S Qᵀ`` it is ``P Qᵀ``.

    The nearest matrix with orthonormal columns (or rows, when x is wide) to ``x``.
    """
    p, _, qh = svd(x)  # (a, d), (d,), (d, b)
    return p @ qh  # (a, b)


def low_rank(x: Tensor, rank: int) -> Tensor:
    """Best rank-``rank`` approximation (Eckart–Young) of each matrix of a (..., p, q) batch."""
    u, s, vh = svd(x)  # (..., p, d), (..., d), (..., d, q)
    r = min(rank, s.shape[-1])
    return (u[..., :r] * s[..., None, :r]) @ vh[..., :r, :]  # (..., p, q)


# ----------------------------------------------------------------------------- masks and TIES


def keep_count(density: float, size: int) -> int:
    """How many entries a top-``density`` mask keeps out of ``size``: ``min(size, int(density * size) + 1)``.

    The count of the TIES paper's code and of the Core Space paper's code (``topk_values_mask``:
    the entries at or above the ``(size - int(density * size))``-th smallest magnitude), so that a
    TIES merge here reproduces theirs; density 1 keeps all ``size``. PEFT and mergekit keep
    ``int(density * size)``: one entry fewer (README, "Where coremerge differs from the reference code").
    ``density * size`` is computed in floating point as theirs is (0.29 * 100 = 28.999...: 29 kept).

    Example:
        >>> keep_count(0.5, 4), keep_count(0.7, 10), keep_count(1.0, 10)
        (3, 8, 10)
    """
    return min(size, int(density * size) + 1)


def topk_mask(tasks: Tensor, density: float) -> Tensor:
    """Per task, the entries of largest magnitude: keep_count(density, p * q) of them.

    An entry is kept when its magnitude reaches the task's k-th largest, so exact ties at the
    threshold are all kept (as ``magnitude >= kth`` keeps them in the TIES and Core Space papers'
    code), and it is not exactly zero (a zero never joins the sign election or the mean, there either).
    """
    num_tasks, p, q = tasks.shape
    k = keep_count(density, p * q)
    if k == p * q:
        return tasks != 0  # (T, p, q): every non-zero entry
    mags = tasks.abs().reshape(num_tasks, p * q)  # (T, p q)
    kth = torch.kthvalue(mags, p * q - k + 1, dim=1, keepdim=True).values  # (T, 1): k-th largest
    keep = (mags >= kth) & (mags > 0)  # (T, p q)
    return keep.reshape(num_tasks, p, q)  # (T, p, q)


def disjoint_mean(tasks: Tensor, keep: Tensor) -> Tensor:
    """TIES' elect-and-average: the mean of the kept entries that agree with the elected sign.

    Elected sign per entry = sign of the sum of the kept entries (+ when that sum is exactly 0).
    Entries with no agreeing kept value are 0. ``keep`` must exclude exact zeros.
    """
    kept = torch.where(keep, tasks, torch.zeros_like(tasks))  # (T, p, q)
    elected_positive = kept.sum(0) >= 0  # (p, q)
    agree = keep & ((tasks > 0) == elected_positive)  # (T, p, q): kept entries are non-zero
    total = torch.where(agree, tasks, torch.zeros_like(tasks)).sum(0)  # (p, q)
    count = agree.sum(0).clamp(min=1).to(tasks.dtype)  # (p, q)
    return total / count  # (p, q)


def dare_drop(tasks: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE's random drop: keep each entry with probability ``density``, divide survivors by it.

    The uniform draws come from ``generator`` on the CPU, one (p, q) float32 draw per task in
    task order, and are then moved to ``tasks.device``: CPU and GPU, float32 and float64 all
    get the same masks for the same generator state.
    """
    num_tasks, p, q = tasks.shape
    draws = torch.stack([torch.rand((p, q), generator=generator, dtype=torch.float32)
                         for _ in range(num_tasks)])  # (T, p, q), on the CPU
    keep = (draws < density).to(tasks.device)  # (T, p, q)
    return torch.where(keep, tasks / density, torch.zeros_like(tasks))  # (T, p, q)
