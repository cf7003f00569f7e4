"""Reference bases of one module's adapters (PAPER.md, step 1).

Stack every adapter's A (r_t, n) into (k, n) and every B (m, r_t) into (m, k),
k = sum of ranks. V = the right singular vectors of the stacked A, U = the left
singular vectors of the stacked B, both untruncated except for exactly-zero
directions. Thin SVDs of k-wide matrices: O((m + n) k^2), never an m x n matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from coremerge.linalg import col_basis, row_basis
from coremerge.types import LoraFactors


@dataclass(frozen=True)
class Basis:
    """Orthonormal reference bases of one module: col(B_t) ⊆ col(u), row(A_t) ⊆ row(v)."""

    u: Tensor  # (m, ku), orthonormal columns
    v: Tensor  # (kv, n), orthonormal rows

    @property
    def core_shape(self) -> tuple[int, int]:
        return self.u.shape[1], self.v.shape[0]


def reference_basis(factors: Sequence[LoraFactors]) -> Basis:
    """SVD bases of the stacked, scaled factors of one module.

    Example:
        >>> fs = [LoraFactors(a=torch.randn(2, 9), b=torch.randn(7, 2)) for _ in range(3)]
        >>> reference_basis(fs).core_shape   # k = 6 <= min(7, 9)
        (6, 6)
    """
    if not factors:
        raise ValueError("reference_basis needs at least one adapter's factors")
    stacked_b = torch.cat([f.b for f in factors], dim=1)  # (m, k)
    stacked_a = torch.cat([f.a for f in factors], dim=0)  # (k, n)
    # Contiguous, so that every later product sees one layout (the pipeline stores and reloads them).
    return Basis(u=col_basis(stacked_b).contiguous(), v=row_basis(stacked_a).contiguous())
