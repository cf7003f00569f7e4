"""Core matrices (PAPER.md, step 2): M_t = (Uᵀ B_t)(A_t Vᵀ), each (ku, kv).

Lossless: because col(B_t) ⊆ col(U) and row(A_t) ⊆ row(V),
U · M_t · V = U Uᵀ B_t A_t Vᵀ V = B_t A_t.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from coremerge.basis import Basis
from coremerge.types import LoraFactors


def project(factors: Sequence[LoraFactors], basis: Basis) -> Tensor:
    """The core matrix of every adapter, stacked: (T, ku, kv).

    Example:
        >>> from coremerge.basis import reference_basis
        >>> fs = [LoraFactors(a=torch.randn(2, 9), b=torch.randn(7, 2)) for _ in range(3)]
        >>> project(fs, reference_basis(fs)).shape
        torch.Size([3, 6, 6])
    """
    return torch.stack([
        (basis.u.T @ f.b) @ (f.a @ basis.v.T)  # (ku, r_t) @ (r_t, kv) -> (ku, kv)
        for f in factors
    ])
