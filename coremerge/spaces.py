"""Where a merge happens: core space (this method), full space and KnOTS (the baselines).

Every space turns one module's adapters into T task matrices, applies the per-adapter
weights (before the merge function, for every method), calls the merge method, and
returns LoRA factors with scale 1:

- core:  task matrices are the (ku, kv) core matrices M_t; ΔW = U · f(w_t M_t) · V.
- full:  task matrices are the dense updates ΔW_t (m, n), what PEFT's *_svd merges and
         mergekit do; the result is factored back by an SVD of the m x n merge.
- knots: SVD of the concatenation [ΔW_1 … ΔW_T] = U S [V_1 … V_T]; the task matrices
         are the per-task right factors V_t (d, n); ΔW = U S f(w_t V_t).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from coremerge import methods
from coremerge.basis import Basis, reference_basis
from coremerge.linalg import factor_between, factor_core, factor_dense, one_thread_if_small, thin_svd
from coremerge.methods._common import check_finite
from coremerge.project import project
from coremerge.types import FactoredLowRank, LoraFactors, LowRank

SPACES = ("core", "full", "knots")


def module_generator(seed: int, module: str) -> torch.Generator:
    """A CPU generator seeded from (seed, module name) through a stable hash.

    The same seed gives the same random masks for a module in any process, on any run
    (Python's ``hash()`` is salted per process, so it is never used).
    """
    digest = hashlib.sha256(f"coremerge:{seed}:{module}".encode()).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator


def check_space(space: str) -> str:
    if space not in SPACES:
        raise ValueError(f"unknown merge space {space!r}; expected one of: {', '.join(SPACES)}")
    return space


@dataclass(frozen=True)
class CoreSpace:
    """One module of one adapter set in core space: the reusable part of every merge.

    A sweep (many methods, alphas, weights over the same adapters) builds this once per
    module and calls :meth:`merge` for each combination. ``cores`` is never modified.

    Example:
        >>> fs = [LoraFactors(a=torch.randn(2, 9), b=torch.randn(7, 2)) for _ in range(3)]
        >>> space = CoreSpace.build(fs)
        >>> merged = space.merge("ta", weights=[1.0, 1.0, 1.0])
        >>> torch.allclose(merged.delta(), sum(f.delta() for f in fs), atol=1e-5)
        True
    """

    basis: Basis
    cores: Tensor  # (T, ku, kv), unweighted
    ranks: tuple[int, ...]

    @classmethod
    def build(cls, factors: Sequence[LoraFactors]) -> "CoreSpace":
        basis = reference_basis(factors)
        return cls(basis=basis, cores=project(factors, basis), ranks=tuple(f.rank for f in factors))

    def merge(self, method: str, *, weights: Sequence[float], alpha: float = 1.0,
              params: Mapping[str, object] | None = None, generator: torch.Generator | None = None,
              rank: int | None = None) -> LowRank:
        core = self.merge_core(method, weights=weights, params=params, generator=generator)
        return self.lowrank(core, alpha=alpha, rank=rank)

    def merge_core(self, method: str, *, weights: Sequence[float], params: Mapping[str, object] | None = None,
                   generator: torch.Generator | None = None) -> Tensor | None:
        """The merged (ku, kv) core matrix at alpha = 1; None where every adapter's update is zero.

        Every method scales its result by alpha as its last step, so :meth:`lowrank` of this
        core at any alpha is, bit for bit, :meth:`merge` at that alpha: a sweep over alpha
        runs the method once.
        """
        tasks = _weighted(self.cores, weights)  # (T, ku, kv)
        if 0 in tasks.shape[1:]:  # every adapter's update is exactly zero here
            return None
        return methods.apply(method, tasks, alpha=1.0, params=params, task_ranks=self.ranks,
                             generator=generator)  # (ku, kv)

    def lowrank(self, core: Tensor | None, *, alpha: float = 1.0, rank: int | None = None) -> LowRank:
        """LoRA factors (scale 1) of U · (alpha core) · V, from :meth:`merge_core`'s core."""
        result = self.factored(core, alpha=alpha, rank=rank)
        return result.expand() if isinstance(result, FactoredLowRank) else result

    def factored(self, core: Tensor | None, *, alpha: float = 1.0,
                 rank: int | None = None) -> FactoredLowRank | LowRank:
        """:meth:`lowrank` before its last products: U and V with this merge's small factors
        (``.expand()`` is :meth:`lowrank`, bit for bit); a zero module (``core`` None) as LowRank."""
        alpha = check_finite(alpha, "alpha")
        if core is None:
            return _zero_module(self.basis.u.shape[0], self.basis.v.shape[1], self.cores, rank)
        return factor_core(self.basis.u, alpha * core, self.basis.v, rank)


def merge_module(factors: Sequence[LoraFactors], *, method: str, space: str = "core",
                 weights: Sequence[float] | None = None, alpha: float = 1.0,
                 params: Mapping[str, object] | None = None, generator: torch.Generator | None = None,
                 rank: int | None = None) -> LowRank:
    """Merge one module's adapters in ``space`` with ``method``; LoRA factors with scale 1.

    ``factors`` hold only the adapters that have this module (an adapter without it is left
    out, not treated as a zero task). ``weights`` default to 1 for each.
    """
    check_space(space)
    if not factors:
        raise ValueError("merge_module needs at least one adapter's factors")
    weights = [1.0] * len(factors) if weights is None else list(weights)
    if len(weights) != len(factors):
        raise ValueError(f"got {len(weights)} weights for {len(factors)} adapters")
    if space == "core":
        return CoreSpace.build(factors).merge(method, weights=weights, alpha=alpha, params=params,
                                              generator=generator, rank=rank)
    deltas = torch.stack([f.delta() for f in factors])  # (T, m, n)
    if space == "full":
        tasks = _weighted(deltas, weights)  # (T, m, n)
        merged = methods.apply(method, tasks, alpha=alpha, params=params, task_ranks=None,
                               generator=generator)  # (m, n)
        return factor_dense(merged, rank)
    return _merge_knots(deltas, factors, method=method, weights=weights, alpha=alpha, params=params,
                        generator=generator, rank=rank)


def _merge_knots(deltas: Tensor, factors: Sequence[LoraFactors], *, method: str, weights: Sequence[float],
                 alpha: float, params: Mapping[str, object] | None, generator: torch.Generator | None,
                 rank: int | None) -> LowRank:
    num_tasks, m, n = deltas.shape
    concat = deltas.permute(1, 0, 2).reshape(m, num_tasks * n)  # (m, T n) = [ΔW_1 … ΔW_T]
    u, s, vh = thin_svd(concat)  # (m, d), (d,), (d, T n)
    if s.numel() == 0:
        return _zero_module(m, n, deltas, rank)
    right = vh.reshape(-1, num_tasks, n).permute(1, 0, 2)  # (T, d, n): V_t
    tasks = _weighted(right, weights)  # (T, d, n)
    merged = methods.apply(method, tasks, alpha=alpha, params=params,
                           task_ranks=tuple(f.rank for f in factors), generator=generator)  # (d, n)
    # ΔW = u · (diag(s) f); u is orthonormal, so truncation needs only the SVD of the (d, n) right side.
    return factor_between(u, s[:, None] * merged, None, rank)


def written_spectrum(merged: LowRank, *, space: str, truncated: bool) -> Tensor:
    """The singular values of ``merged.delta()`` (descending, float64), read off the LoRA factors a
    merge in ``space`` returns (:func:`merge_module`, :meth:`CoreSpace.lowrank`), never forming it.

    - ``full``, or any space with a ``rank`` truncation (``truncated``): the factors are an SVD's,
      ``b = u_q s_q`` and ``a = v_qᵀ``, so the singular values are b's column norms: no decomposition.
    - ``core``: ``a = V`` has orthonormal rows, ``b = U M``: they are b's (those of M), from the
      eigenvalues of its (k, k) Gram matrix.
    - ``knots``: ``b = u`` has orthonormal columns, ``a = diag(s) f``: they are a's, from its (d, d) Gram.

    Example:
        >>> fs = [LoraFactors(a=torch.randn(2, 9), b=torch.randn(7, 2)) for _ in range(3)]
        >>> s = written_spectrum(merge_module(fs, method="ta", space="core"), space="core", truncated=False)
        >>> torch.allclose(s, torch.linalg.svdvals(sum(f.delta() for f in fs)).double()[:6], atol=1e-4)
        True
    """
    check_space(space)
    b, a = merged.b.to(torch.float64), merged.a.to(torch.float64)  # (m, q), (q, n)
    if space == "full" or truncated:
        s = b.norm(dim=0)  # (q,)
    else:
        x = b if space == "core" else a.T  # the factor that is not an isometry, as (·, q)
        with one_thread_if_small(x.shape[1], x.shape[1]):
            s = torch.linalg.eigvalsh(x.T @ x).clamp_min(0).sqrt()  # (q,)
    return s.sort(descending=True).values  # (q,)


def _weighted(tasks: Tensor, weights: Sequence[float]) -> Tensor:
    w = torch.as_tensor(list(weights), dtype=tasks.dtype, device=tasks.device)  # (T,)
    return tasks * w[:, None, None]  # (T, p, q), a new tensor: cached cores stay untouched


def _zero_module(m: int, n: int, like: Tensor, rank: int | None) -> LowRank:
    """A rank-1 all-zero LoRA module (PEFT needs r >= 1) for a module whose every update is zero."""
    return LowRank(a=like.new_zeros(1, n), b=like.new_zeros(m, 1), energy_kept=None if rank is None else 1.0)
