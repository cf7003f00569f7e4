"""TIES-Merging: trim, elect sign, disjoint merge.

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023
(arXiv 2306.01708).
"""

from __future__ import annotations

from torch import Tensor

from coremerge.methods._common import check_density, check_finite, check_tasks, disjoint_mean, topk_mask


def merge(tasks: Tensor, *, alpha: float = 1.0, density: float = 0.7) -> Tensor:
    """TIES: per task keep the top ``density`` fraction by magnitude, elect a sign per entry,
    average the kept entries that agree with it.

    ``density`` is the fraction kept, in (0, 1]: ``min(p q, int(density * p * q) + 1)`` entries per
    task, the count of the TIES paper's code and the Core Space paper's code (PEFT and mergekit keep
    one fewer); ties at the threshold are all kept; exact zeros never count as kept.
    The elected sign is that of the sum of the kept entries, + when the sum is exactly 0 (as PEFT
    and mergekit; the papers' code takes the sign of the module's majority there).
    Per-adapter weights are multiplied into ``tasks`` before this runs, so the mean of the agreeing
    entries divides by their count, not by the sum of their weights (mergekit's rule).

    Example:
        >>> tasks = torch.tensor([[[1.0, -2.0]], [[3.0, 1.0]]])   # (T=2, 1, 2)
        >>> merge(tasks, density=1.0)
        tensor([[ 2., -2.]])
    """
    check_tasks(tasks, "ties")
    check_finite(alpha, "alpha")
    density = check_density(density)
    # γ_t = top-k mask of |τ_t|;  σ = sgn(Σ_t γ_t ⊙ τ_t);  τ = α · mean_{t: γ_t ∧ sgn τ_t = σ} τ_t
    keep = topk_mask(tasks, density)  # (T, p, q)
    return alpha * disjoint_mean(tasks, keep)  # (p, q)
