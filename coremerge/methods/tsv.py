"""Task Singular Vectors (TSV-Merge).

Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging",
CVPR 2025 (arXiv 2412.00081).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from coremerge.methods._common import check_finite, check_task_ranks, check_tasks, nonzero_spectrum, polar, svd


def merge(tasks: Tensor, *, alpha: float = 1.0, task_ranks: Sequence[int] | None = None) -> Tensor:
    """TSV: keep each task's top singular components, orthogonalise the concatenated bases.

    Task t keeps c_t components: min(task_ranks[t], min(p, q)) when ``task_ranks`` is given
    (core space passes each adapter's rank), else max(1, min(p, q) // T) as in the TSV paper.
    Components at or below the task's numerical-rank tolerance (s_max * max(p, q) * eps) are
    not kept: a rank-deficient task contributes only its non-zero spectrum.

    Example:
        >>> x = torch.diag(torch.tensor([3.0, 2.0, 0.0]))
        >>> merge(x[None], task_ranks=[2])
        tensor([[3., 0., 0.],
                [0., 2., 0.],
                [0., 0., 0.]])
    """
    num_tasks, p, q = check_tasks(tasks, "tsv")
    check_finite(alpha, "alpha")
    d = min(p, q)
    if task_ranks is None:
        budget = (max(1, d // num_tasks),) * num_tasks
    else:
        budget = tuple(min(r, d) for r in check_task_ranks(task_ranks, num_tasks, "tsv"))
    u, s, vh = svd(tasks)  # (T, p, d), (T, d), (T, d, q)
    # Components at or below a task's numerical-rank tolerance carry s ≈ 0 and directions the SVD
    # picks arbitrarily; left in, they would rotate the other tasks' directions in the polar factor.
    keep = tuple(min(c, int(nonzero_spectrum(s[t], (p, q)).sum())) for t, c in enumerate(budget))
    if sum(keep) == 0:  # every task is zero
        return torch.zeros_like(tasks[0])  # (p, q)
    u_cat = torch.cat([u[t, :, :c] for t, c in enumerate(keep)], dim=1)  # (p, C), C = Σ c_t
    s_cat = torch.cat([s[t, :c] for t, c in enumerate(keep)])  # (C,)
    v_cat = torch.cat([vh[t, :c].T for t, c in enumerate(keep)], dim=1)  # (q, C)
    # U⊥ = polar([U_1 … U_T]),  V⊥ = polar([V_1 … V_T]);  τ = α U⊥ diag([s_1 … s_T]) V⊥ᵀ
    u_orth = polar(u_cat)  # (p, C)
    v_orth = polar(v_cat)  # (q, C)
    return alpha * ((u_orth * s_cat) @ v_orth.T)  # (p, q)


def merge_literal(tasks: Tensor, *, alpha: float = 1.0) -> Tensor:
    """TSV as the Core Space paper's code computes it (``get_tsv_delta_w``): every task keeps its
    top int(min(p, q) / T) singular components, whatever its rank.

    For the paper's full-space TSV baseline (and its core-space TSV of adapters of unequal ranks)
    only: a task of rank r_t below that count brings components of singular value ~0 whose
    directions the SVD picks arbitrarily (the singular vectors of rounding noise). They add nothing
    themselves, but they enter the polar factors and rotate every other task's directions, so the
    result depends on the LAPACK build and the compute dtype. :func:`merge` keeps each task's own
    non-zero spectrum instead. Every task zero, or T > min(p, q) (no component each) -> zeros.

    Example:
        >>> x = torch.diag(torch.tensor([3.0, 2.0, 0.0]))
        >>> merge_literal(x[None])   # one task keeps all 3 components: itself
        tensor([[3., 0., 0.],
                [0., 2., 0.],
                [0., 0., 0.]])
    """
    num_tasks, p, q = check_tasks(tasks, "tsv_literal")
    check_finite(alpha, "alpha")
    c = int(min(p, q) * (1 / num_tasks))  # the reference's int(s.shape[0] * sv_reduction)
    if c == 0:
        return torch.zeros_like(tasks[0])  # (p, q)
    u, s, vh = svd(tasks)  # (T, p, d), (T, d), (T, d, q)
    u_cat = torch.cat(list(u[:, :, :c].unbind(0)), dim=1)  # (p, T c)
    s_cat = s[:, :c].reshape(-1)  # (T c,)
    v_cat = torch.cat([vh[t, :c].T for t in range(num_tasks)], dim=1)  # (q, T c)
    # τ = α polar([U_1 … U_T]) diag([s_1 … s_T]) polar([V_1 … V_T])ᵀ, c components each
    return alpha * ((polar(u_cat) * s_cat) @ polar(v_cat).T)  # (p, q)
