"""Task Arithmetic.

Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023 (arXiv 2212.04089).
"""

from __future__ import annotations

from torch import Tensor

from coremerge.methods._common import check_finite, check_tasks


def merge(tasks: Tensor, *, alpha: float = 1.0) -> Tensor:
    """Task arithmetic: the scaled sum of the task matrices.

    Example:
        >>> tasks = torch.ones(3, 2, 2)
        >>> merge(tasks, alpha=0.5)
        tensor([[1.5000, 1.5000],
                [1.5000, 1.5000]])
    """
    check_tasks(tasks, "ta")
    check_finite(alpha, "alpha")
    # τ = α Σ_t τ_t
    return alpha * tasks.sum(0)  # (p, q)
