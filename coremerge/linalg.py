"""Small linear-algebra helpers for the core-space math: thin SVDs that drop
exactly-zero directions, and factorizations that never form an m x n matrix.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from coremerge.types import FactoredLowRank, LowRank

log = logging.getLogger(__name__)

SMALL = 1024  # decompositions of matrices no wider than this run on one thread


@contextmanager
def one_thread_if_small(*shape: int) -> Iterator[None]:
    """Run a small LAPACK call on one thread.

    A k x k eigen- or singular-value decomposition (k ~ 100s) is over in milliseconds on one
    thread, but its threaded version waits on thread barriers: on a busy machine (Ray
    workers side by side, other jobs) we measured 0.5-3 s instead of 3 ms for a 128 x 128
    eigh with 2 threads. Large decompositions keep every thread.
    """
    threads = torch.get_num_threads()
    if threads == 1 or min(shape[-2:]) > SMALL:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def rank_tolerance(s: Tensor, shape: tuple[int, int]) -> float:
    """The numerical-rank cut-off for singular values ``s`` of a matrix of ``shape``.

    Singular values at or below ``s_max * max(shape) * eps`` are what float error
    leaves of exactly-zero directions (the rule numpy's ``matrix_rank`` uses).
    """
    if s.numel() == 0:
        return 0.0
    eps = torch.finfo(s.dtype).eps
    return float(s.max()) * max(shape) * eps


def svd(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``x = u @ diag(s) @ vh`` (batched over leading dims) that does not give up.

    LAPACK's divide-and-conquer SVD (gesdd, what torch uses on the CPU) can fail to converge on
    float32 matrices with many repeated singular values: Iso-CTS in full space builds such
    matrices from the arbitrary null-space directions of low-rank tasks (seen on SmolLM2's
    576 x 576 up_proj). Then the same SVD runs in float64, and if that fails too, on the
    transpose; the factors come back in ``x``'s dtype.
    """
    with one_thread_if_small(*x.shape[-2:]):
        try:
            return torch.linalg.svd(x, full_matrices=False)  # (..., p, d), (..., d), (..., d, q)
        except torch.linalg.LinAlgError:
            log.debug("SVD of a %s %s matrix did not converge; retrying in float64", tuple(x.shape), x.dtype)
        x64 = x.to(torch.float64)
        try:
            u, s, vh = torch.linalg.svd(x64, full_matrices=False)
        except torch.linalg.LinAlgError:
            v, s, uh = torch.linalg.svd(x64.mT, full_matrices=False)  # xᵀ = v s uᵀ
            u, vh = uh.mT, v.mT
    return u.to(x.dtype), s.to(x.dtype), vh.to(x.dtype)


def thin_svd(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``x = u @ diag(s) @ vh`` keeping only the non-zero spectrum.

    A matrix far from square is first reduced by a QR factorization of its tall
    orientation (LAPACK's SVD of a wide k x n matrix is many times slower than QR plus
    the SVD of the small k x k factor, and no less accurate).

    Example:
        >>> x = torch.ones(4, 3, dtype=torch.float64)   # rank 1
        >>> u, s, vh = thin_svd(x)
        >>> u.shape, s.shape, vh.shape
        (torch.Size([4, 1]), torch.Size([1]), torch.Size([1, 3]))
    """
    m, n = x.shape
    if m >= 2 * n:
        q, r = torch.linalg.qr(x)  # (m, n), (n, n)
        p, s, vh = svd(r)  # (n, n), (n,), (n, n)
        u = q @ p  # (m, n)
    elif n >= 2 * m:
        vt, s, uh = thin_svd(x.T)  # x.T = vt s uh  ->  x = uh.T s vt.T
        return uh.T, s, vt.T
    else:
        u, s, vh = svd(x)  # (m, d), (d,), (d, n)
    keep = int((s > rank_tolerance(s, (m, n))).sum())
    return u[:, :keep], s[:keep], vh[:keep]


def col_basis(x: Tensor) -> Tensor:
    """Orthonormal columns spanning col(x), ordered by singular value: (m, rank).

    float32 (the default compute dtype): the eigen-decomposition of the k x k Gram matrix
    xᵀx formed in float64, u = x w s⁻¹. Its error is far below float32's own rounding
    (eigenvalues of a float64 Gram matrix resolve singular values down to ~1e-8 s_max,
    and the cut-off for float32 is s_max * max(shape) * 1.2e-7), and it costs one
    m k² product instead of an SVD of the m x k matrix: about 10x faster on a CPU.
    float64: an exact thin SVD (QR, then the SVD of the small factor).
    """
    if x.dtype == torch.float64:
        u, _, _ = thin_svd(x)
        return u
    m, k = x.shape
    x64 = x.to(torch.float64)  # (m, k)
    if m <= k:  # col(x) is spanned by the eigenvectors of x xᵀ (m, m) directly
        gram = x64 @ x64.T  # (m, m)
        with one_thread_if_small(m, m):
            evals, w = torch.linalg.eigh(gram)  # ascending
        s = evals.flip(0).clamp_min(0).sqrt()  # (m,)
        keep = int((s > rank_tolerance(s.to(x.dtype), (m, k))).sum())
        return w.flip(1)[:, :keep].to(x.dtype)  # (m, keep)
    gram = x64.T @ x64  # (k, k)
    with one_thread_if_small(k, k):
        evals, w = torch.linalg.eigh(gram)  # (k,), (k, k) ascending
    s, w = evals.flip(0).clamp_min(0).sqrt(), w.flip(1)  # descending
    keep = int((s > rank_tolerance(s.to(x.dtype), (m, k))).sum())
    return ((x64 @ w[:, :keep]) / s[:keep]).to(x.dtype)  # (m, keep): x w s⁻¹


def row_basis(x: Tensor) -> Tensor:
    """Orthonormal rows spanning row(x), ordered by singular value: (rank, n)."""
    return col_basis(x.T).T


def factor_between(u: Tensor, core: Tensor, v: Tensor | None, rank: int | None) -> LowRank:
    """LoRA factors of ``u @ core @ v`` (u orthonormal columns, v orthonormal rows or None = identity).

    Without ``rank``: ``b = u @ core``, ``a = v`` (``b = u``, ``a = core`` when v is None):
    exact, no decomposition.
    With ``rank``: the SVD of the small ``core = p s qᵀ`` gives the best rank-q approximation
    of the whole product (u and v are isometries), ``b = u p_q s_q``, ``a = q_qᵀ v``,
    and ``energy_kept`` = the share of ‖core‖²_F kept.
    """
    if v is None:
        if rank is None:
            return LowRank(a=core, b=u)  # (d, n), (m, d)
        x, y, energy = _truncated(core, rank)
        return LowRank(a=y, b=u @ x, energy_kept=energy)
    return factor_core(u, core, v, rank).expand()


def factor_core(u: Tensor, core: Tensor, v: Tensor, rank: int | None) -> FactoredLowRank:
    """:func:`factor_between` (with ``v``) one multiplication short: ``u @ x @ y @ v``, x and y small.

    Without ``rank``: x = core, y = None (all four made contiguous). With ``rank``: the SVD of ``core = p s qᵀ`` gives
    x = p_q s_q (ku, q) and y = q_qᵀ (q, kv). The pipeline stores u and v once per adapter set and
    module and x, y per merge; ``.expand()`` then gives exactly what factor_between gives.
    """
    # Every factor contiguous: the products then see the layout a stored and reloaded copy has
    # (a transposed operand can take another BLAS path, and other last bits).
    u, v = u.contiguous(), v.contiguous()
    if rank is None:
        return FactoredLowRank(u=u, x=core.contiguous(), y=None, v=v)
    x, y, energy = _truncated(core, rank)
    return FactoredLowRank(u=u, x=x.contiguous(), y=y.contiguous(), v=v, energy_kept=energy)


def _truncated(core: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """The best rank-``rank`` split of ``core = p s qᵀ``: (p_q s_q, q_qᵀ, share of the energy kept)."""
    p, s, qh = thin_svd(core)  # (ku, d), (d,), (d, kv)
    q = min(rank, s.shape[0])
    return p[:, :q] * s[:q], qh[:q], _energy(s, q)


def _energy(s: Tensor, q: int) -> float:
    """The share of the squared Frobenius norm the first q singular values hold (1.0 for a zero matrix)."""
    total = float((s * s).sum())
    return 1.0 if total == 0.0 else float((s[:q] * s[:q]).sum()) / total


def rank_for_energy(s: Tensor, share: float) -> int:
    """The fewest leading singular values of ``s`` whose squares hold ``share`` of the total: the
    smallest rank q whose best rank-q approximation keeps that share of ‖·‖²_F (0 for a zero matrix).

    ``s`` need not be sorted (a copy is). Computed in float64.

    Example:
        >>> rank_for_energy(torch.tensor([1.0, 3.0, 0.0]), 0.9)   # 9 of 10 in the largest
        1
    """
    e = s.to(torch.float64).sort(descending=True).values ** 2  # (d,)
    total = float(e.sum())
    if total == 0.0:
        return 0
    short = int((torch.cumsum(e, 0) < share * total * (1 - 1e-12)).sum())  # prefixes that fall short
    return min(short + 1, int((e > 0).sum()))


def factor_dense(delta: Tensor, rank: int | None) -> LowRank:
    """LoRA factors of a dense update (m, n) by its SVD: the full-space baseline's last step.

    Keeps the numerical rank, or ``rank`` components when given (best rank-q approximation):
    ``b = u_q s_q``, ``a = v_qᵀ``, so the singular values stay readable as b's column norms.
    """
    u, s, vh = thin_svd(delta)  # (m, d), (d,), (d, n)
    q = s.shape[0] if rank is None else min(rank, s.shape[0])
    energy = None if rank is None else _energy(s, q)
    if q == 0:  # an all-zero update still needs rank >= 1 to be a LoRA module
        q, u, s, vh = 1, delta.new_zeros(delta.shape[0], 1), delta.new_zeros(1), delta.new_zeros(1, delta.shape[1])
    return LowRank(a=vh[:q], b=u[:, :q] * s[:q], energy_kept=energy)
