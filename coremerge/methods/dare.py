"""DARE: Drop And REscale, followed by task arithmetic (dare) or by TIES' sign election (dare_ties).

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch", ICML 2024 (arXiv 2311.03099).
"""

from __future__ import annotations

import torch
from torch import Tensor

from coremerge.methods._common import (check_density, check_finite, check_generator, check_tasks, dare_drop,
                                       disjoint_mean)


def merge(tasks: Tensor, *, alpha: float = 1.0, density: float = 0.1,
          generator: torch.Generator | None = None) -> Tensor:
    """DARE then task arithmetic: keep each entry with probability ``density``, rescale by 1/density, sum.

    ``density`` = 0.1 drops 90% of the entries; ``density`` = 1 keeps everything (equals ta).
    ``generator`` (a CPU torch.Generator) is required: masks are drawn from it, task 0 first.

    Example:
        >>> out = merge(torch.randn(3, 4, 5), density=0.5, generator=torch.Generator().manual_seed(0))
        >>> out.shape
        torch.Size([4, 5])
    """
    check_tasks(tasks, "dare")
    check_finite(alpha, "alpha")
    density = check_density(density)
    generator = check_generator(generator, "dare")
    # m_t ~ Bernoulli(density);  τ = α Σ_t (m_t ⊙ τ_t) / density
    dropped = dare_drop(tasks, density, generator)  # (T, p, q)
    return alpha * dropped.sum(0)  # (p, q)


def merge_ties(tasks: Tensor, *, alpha: float = 1.0, density: float = 0.1,
               generator: torch.Generator | None = None) -> Tensor:
    """DARE's drop, then TIES' sign election and disjoint mean with nothing further trimmed.

    Every non-zero survivor of the drop is kept; the elected sign is that of their sum
    (+ when exactly 0); the result is the mean of the survivors that agree with it.

    Example:
        >>> out = merge_ties(torch.randn(3, 4, 5), density=0.5, generator=torch.Generator().manual_seed(0))
        >>> out.shape
        torch.Size([4, 5])
    """
    check_tasks(tasks, "dare_ties")
    check_finite(alpha, "alpha")
    density = check_density(density)
    generator = check_generator(generator, "dare_ties")
    # τ̃_t = m_t ⊙ τ_t / density;  σ = sgn(Σ_t τ̃_t);  τ = α · mean_{t: τ̃_t ≠ 0, sgn τ̃_t = σ} τ̃_t
    dropped = dare_drop(tasks, density, generator)  # (T, p, q)
    return alpha * disjoint_mean(dropped, dropped != 0)  # (p, q)
