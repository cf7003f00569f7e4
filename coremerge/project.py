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
    left = basis.u.T @ torch.cat([f.b for f in factors], dim=1)  # (ku, k): [Uᵀ B_1 … Uᵀ B_T]
    right = torch.cat([f.a for f in factors], dim=0) @ basis.v.T  # (k, kv): [A_1 Vᵀ; … ; A_T Vᵀ]
    cores, start = [], 0
    for f in factors:
        stop = start + f.rank
        cores.append(left[:, start:stop] @ right[start:stop])  # (ku, r_t) @ (r_t, kv) -> (ku, kv)
        start = stop
    return torch.stack(cores)  # (T, ku, kv)
