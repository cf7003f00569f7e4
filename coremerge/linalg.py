"""Small linear-algebra helpers for the core-space math: thin SVDs that drop
exactly-zero directions, and factorizations that never form an m x n matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

from coremerge.types import LowRank


def rank_tolerance(s: Tensor, shape: tuple[int, int]) -> float:
    """The numerical-rank cut-off for singular values ``s`` of a matrix of ``shape``.

    Singular values at or below ``s_max * max(shape) * eps`` are what float error
    leaves of exactly-zero directions (the rule numpy's ``matrix_rank`` uses).
    """
    if s.numel() == 0:
        return 0.0
    eps = torch.finfo(s.dtype).eps
    return float(s.max()) * max(shape) * eps


def thin_svd(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``x = u @ diag(s) @ vh`` keeping only the non-zero spectrum.

    Example:
        >>> x = torch.ones(4, 3, dtype=torch.float64)   # rank 1
        >>> u, s, vh = thin_svd(x)
        >>> u.shape, s.shape, vh.shape
        (torch.Size([4, 1]), torch.Size([1]), torch.Size([1, 3]))
    """
    u, s, vh = torch.linalg.svd(x, full_matrices=False)  # (m, d), (d,), (d, n)
    keep = int((s > rank_tolerance(s, tuple(x.shape))).sum())
    return u[:, :keep], s[:keep], vh[:keep]


def col_basis(x: Tensor) -> Tensor:
    """Orthonormal columns spanning col(x), ordered by singular value: (m, rank)."""
    u, _, _ = thin_svd(x)
    return u


def row_basis(x: Tensor) -> Tensor:
    """Orthonormal rows spanning row(x), ordered by singular value: (rank, n)."""
    _, _, vh = thin_svd(x)
    return vh


def factor_between(u: Tensor, core: Tensor, v: Tensor | None, rank: int | None) -> LowRank:
    """LoRA factors of ``u @ core @ v`` (u orthonormal columns, v orthonormal rows or None = identity).

    Without ``rank``: ``b = u @ core``, ``a = v`` (``b = u``, ``a = core`` when v is None):
    exact, no decomposition.
    With ``rank``: the SVD of the small ``core = p s qᵀ`` gives the best rank-q approximation
    of the whole product (u and v are isometries), ``b = u p_q s_q``, ``a = q_qᵀ v``,
    and ``energy_kept`` = the share of ‖core‖²_F kept.
    """
    if rank is None:
        if v is None:
            return LowRank(a=core, b=u)  # (d, n), (m, d)
        return LowRank(a=v, b=u @ core)  # (kv, n), (m, kv)
    p, s, qh = thin_svd(core)  # (ku, d), (d,), (d, kv)
    q = min(rank, s.shape[0])
    total = float((s * s).sum())
    kept = float((s[:q] * s[:q]).sum())
    b = u @ (p[:, :q] * s[:q])  # (m, q)
    a = qh[:q] if v is None else qh[:q] @ v  # (q, n)
    return LowRank(a=a, b=b, energy_kept=1.0 if total == 0.0 else kept / total)


def factor_dense(delta: Tensor, rank: int | None) -> LowRank:
    """LoRA factors of a dense update (m, n) by its SVD: the full-space baseline's last step.

    Keeps the numerical rank, or ``rank`` components when given (best rank-q approximation).
    """
    u, s, vh = thin_svd(delta)  # (m, d), (d,), (d, n)
    q = s.shape[0] if rank is None else min(rank, s.shape[0])
    total = float((s * s).sum())
    kept = float((s[:q] * s[:q]).sum())
    energy = None if rank is None else (1.0 if total == 0.0 else kept / total)
    if q == 0:  # an all-zero update still needs rank >= 1 to be a LoRA module
        q, u, s, vh = 1, delta.new_zeros(delta.shape[0], 1), delta.new_zeros(1), delta.new_zeros(1, delta.shape[1])
    return LowRank(a=vh[:q], b=u[:, :q] * s[:q], energy_kept=energy)
