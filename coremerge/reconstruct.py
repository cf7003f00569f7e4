"""Back from core space to LoRA factors (PAPER.md, step 4).

ΔW = U · M · V. As a LoRA adapter with scale 1: B' = U·M (m, kv), A' = V (kv, n).
Truncation to rank q uses the SVD of the small core, M = P S Qᵀ:
B' = U·P_q·S_q, A' = Q_qᵀ·V, the best rank-q approximation of ΔW since U and V
are isometries. ΔW itself is never formed.
"""

from __future__ import annotations

from torch import Tensor

from coremerge.basis import Basis
from coremerge.linalg import factor_between
from coremerge.types import LowRank


def to_lowrank(basis: Basis, core: Tensor, *, rank: int | None = None) -> LowRank:
    """LoRA factors (scale 1) of ``basis.u @ core @ basis.v``; ``rank`` truncates optimally."""
    return factor_between(basis.u, core, basis.v, rank)
