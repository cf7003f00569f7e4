"""DARE: Drop And REscale, followed by task arithmetic (dare) or by TIES (dare_ties: an optional trim,
the sign election and the disjoint mean).

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch", ICML 2024 (arXiv 2311.03099).
"""

from __future__ import annotations

import torch
from torch import Tensor

from coremerge.methods._common import (check_density, check_finite, check_generator, check_tasks, dare_drop,
                                       disjoint_mean, topk_mask)


def merge(tasks: Tensor, *, alpha: float = 1.0, density: float = 0.1,
          generator: torch.Generator | None = None) -> Tensor:
    """DARE then task arithmetic: keep each entry with probability ``density``, rescale by 1/density, sum.

    ``density`` is the fraction kept, as in PEFT and mergekit (the reference code's and the DARE
    paper's drop rate p is 1 - density): 0.1 drops 90% of the entries; 1 keeps everything (equals ta).
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


def merge_ties(tasks: Tensor, *, alpha: float = 1.0, density: float = 0.1, ties_density: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
    """DARE's drop, then TIES: an optional trim, the sign election and the disjoint mean.

    ``density`` is DARE's: the probability of keeping an entry (the reference code's
    ``dare_pruning_coeffs`` p is 1 - density). ``ties_density`` is TIES' trim of the dropped and
    rescaled task, the fraction of its p * q entries kept by magnitude, counted as in
    :func:`coremerge.methods.ties.merge`. At 1 (the default) nothing is trimmed: every non-zero
    survivor of the drop is kept, as PEFT's ``dare_ties`` does. Below 1 it is the Core Space paper's
    code's dare-ties (its ``topK``), which trims after the drop. The elected sign is that of the
    sum of the kept entries (+ when exactly 0); the result is the mean of those that agree with it.

    Example:
        >>> out = merge_ties(torch.randn(3, 4, 5), density=0.5, generator=torch.Generator().manual_seed(0))
        >>> out.shape
        torch.Size([4, 5])
    """
    check_tasks(tasks, "dare_ties")
    check_finite(alpha, "alpha")
    density = check_density(density)
    ties_density = check_density(ties_density, "ties_density")
    generator = check_generator(generator, "dare_ties")
    # τ̃_t = m_t ⊙ τ_t / density;  γ_t = top-k mask of |τ̃_t| (k from ties_density; all non-zero at 1)
    # σ = sgn(Σ_t γ_t ⊙ τ̃_t);  τ = α · mean_{t: γ_t ∧ sgn τ̃_t = σ} τ̃_t
    dropped = dare_drop(tasks, density, generator)  # (T, p, q)
    keep = topk_mask(dropped, ties_density)  # (T, p, q)
    return alpha * disjoint_mean(dropped, keep)  # (p, q)
