"""Isotropic merging: Iso-C (common subspace) and Iso-CTS (common and task-specific subspaces).

Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces", ICML 2025 (arXiv 2502.04959).
"""

from __future__ import annotations

import torch
from torch import Tensor

from coremerge.methods._common import check_common_fraction, check_finite, check_tasks, nonzero_spectrum, polar, svd


def merge_c(tasks: Tensor, *, alpha: float = 1.0) -> Tensor:
    """Iso-C: the task-arithmetic sum with its non-zero singular values replaced by their mean.

    Singular values at or below the numerical-rank tolerance (s_max * max(p, q) * eps) stay 0,
    so Iso-C in core space equals full-space Iso-C on the non-zero spectrum. Zero input -> zeros.

    Example:
        >>> merge_c(torch.diag(torch.tensor([3.0, 1.0, 0.0]))[None])
        tensor([[2., 0., 0.],
                [0., 2., 0.],
                [0., 0., 0.]])
    """
    _, p, q = check_tasks(tasks, "iso_c")
    check_finite(alpha, "alpha")
    total = tasks.sum(0)  # (p, q)
    u, s, vh = svd(total)  # (p, d), (d,), (d, q)
    nonzero = nonzero_spectrum(s, (p, q))  # (d,)
    if not bool(nonzero.any()):
        return torch.zeros_like(total)  # (p, q)
    # Σ_t τ_t = U S Vᵀ;  τ = α U (mean_{s_i > tol} s_i · 1_{s_i > tol}) Vᵀ
    flat = torch.where(nonzero, s[nonzero].mean(), torch.zeros_like(s))  # (d,)
    return alpha * ((u * flat) @ vh)  # (p, q)


def merge_c_literal(tasks: Tensor, *, alpha: float = 1.0) -> Tensor:
    """Iso-C as the Core Space paper's code computes it (``isotropize_matrix``): every one of the
    min(p, q) singular values of the task-arithmetic sum, zeros included, replaced by their mean.

    For the paper's full-space Iso-C baseline only: on a sum of LoRA updates (rank k < min(p, q))
    it spreads the spectrum over min(p, q) - k directions the SVD picks arbitrarily (the singular
    vectors of rounding noise), which then hold (min(p, q) - k) / min(p, q) of the update's energy
    and depend on the LAPACK build and the compute dtype. :func:`merge_c` flattens only the non-zero
    spectrum; on a full-rank sum (a core matrix, usually) the two are the same.

    Example:
        >>> merge_c_literal(torch.diag(torch.tensor([3.0, 1.0, 2.0]))[None])
        tensor([[2., 0., 0.],
                [0., 2., 0.],
                [0., 0., 2.]])
    """
    _, p, q = check_tasks(tasks, "iso_c_literal")
    check_finite(alpha, "alpha")
    u, s, vh = svd(tasks.sum(0))  # (p, d), (d,), (d, q)
    # Σ_t τ_t = U S Vᵀ;  τ = α U (mean_i s_i) Vᵀ over all d = min(p, q) singular values
    return alpha * ((u * s.mean()) @ vh)  # (p, q)


def split_sizes(d: int, num_tasks: int, common_fraction: float) -> tuple[int, int]:
    """(common size c, per-task size s) with c + s * T = d, as the Iso-CTS reference code computes them.

    c = int(d * common_fraction); s = round((d - c) / T); then c = d - s * T. When rounding up
    would leave c < 0, s = d // T instead (s = 0 makes the whole spectrum common).
    """
    common = int(d * common_fraction)
    per_task = round((d - common) / num_tasks)
    if per_task * num_tasks > d:
        per_task = d // num_tasks
    return d - per_task * num_tasks, per_task


def merge_cts(tasks: Tensor, *, alpha: float = 1.0, common_fraction: float = 0.8) -> Tensor:
    """Iso-CTS: a common subspace from the TA sum plus each task's top directions outside it,
    orthogonalised, with an isotropic (flat) spectrum.

    Example:
        >>> out = merge_cts(torch.randn(3, 6, 8), common_fraction=0.5)
        >>> out.shape
        torch.Size([6, 8])
    """
    num_tasks, p, q = check_tasks(tasks, "iso_cts")
    check_finite(alpha, "alpha")
    common_fraction = check_common_fraction(common_fraction)
    common, per_task = split_sizes(min(p, q), num_tasks, common_fraction)
    u, s, vh = svd(tasks.sum(0))  # (p, d), (d,), (d, q)
    u_c, s_c, vh_c = u[:, :common], s[:common], vh[:common]  # (p, c), (c,), (c, q)
    # R_t = (I - U_c U_cᵀ) τ_t: each task's part outside the common subspace
    residual = tasks - u_c @ (u_c.T @ tasks)  # (T, p, q)
    u_r, s_r, vh_r = svd(residual)  # (T, p, d), (T, d), (T, d, q)
    u_cat = torch.cat([*u_r[:, :, :per_task].unbind(0), u_c], dim=1)  # (p, d)
    s_cat = torch.cat([*s_r[:, :per_task].unbind(0), s_c])  # (d,)
    vh_cat = torch.cat([*vh_r[:, :per_task].unbind(0), vh_c], dim=0)  # (d, q)
    # τ = α · polar([U_1 … U_T U_c]) · mean(s) I · polar([V_1 … V_T V_c]ᵀ)
    u_orth = polar(u_cat)  # (p, d)
    vh_orth = polar(vh_cat)  # (d, q)
    return alpha * ((u_orth * s_cat.mean()) @ vh_orth)  # (p, q)
