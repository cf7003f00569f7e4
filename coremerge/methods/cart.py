"""CART: Centered Arithmetic with Rank-reduced Task vectors.

Choi et al., "Revisiting Weight Averaging for Model Merging", 2024 (arXiv 2412.12153).
"""

from __future__ import annotations

import math

from torch import Tensor

from coremerge.methods._common import check_density, check_finite, check_tasks, low_rank


def merge(tasks: Tensor, *, alpha: float = 1.0, density: float = 0.04, lam: float = 0.1) -> Tensor:
    """CART: the mean of the tasks plus ``lam`` times the sum of their centred low-rank parts.

    ``density`` is the rank fraction kept, in (0, 1]: rank ceil(density * min(p, q)), at least 1.
    ``lam`` scales the centred part; ``alpha`` scales the whole result. The rank rule and both
    defaults (density 0.04, lam 0.1) are those of the Core Space paper's code (``get_cart_delta_w``;
    its released scripts never set lam to anything else).

    Example:
        >>> x = torch.randn(1, 4, 5)
        >>> torch.allclose(merge(x), x[0])   # one task: the mean is the task, nothing is centred
        True
    """
    _, p, q = check_tasks(tasks, "cart")
    check_finite(alpha, "alpha")
    density = check_density(density)
    lam = check_finite(lam, "lam")
    rank = math.ceil(density * min(p, q))  # >= 1 for density > 0; min(p, q) at density 1
    # θ̄ = mean_t τ_t;  τ = α (θ̄ + λ Σ_t LowRank_q(τ_t − θ̄))
    mean = tasks.mean(0)  # (p, q)
    centred = low_rank(tasks - mean, rank)  # (T, p, q)
    return alpha * (mean + lam * centred.sum(0))  # (p, q)
