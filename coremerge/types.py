"""Plain data types shared by the math, the PEFT I/O and the pipeline.

Everything here is tensors and numbers: no files, no scales to interpret.
A LoRA update of one linear layer W (m x n) is ``delta = b @ a`` with the
adapter's scale already folded into ``b`` (peft_io does that, once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LoraFactors:
    """One adapter's update of one module: ``delta = b @ a``, scale folded into ``b``.

    Example:
        >>> f = LoraFactors(a=torch.randn(4, 10), b=torch.randn(6, 4))
        >>> f.rank, f.out_features, f.in_features
        (4, 6, 10)
    """

    a: Tensor  # (r, n)
    b: Tensor  # (m, r)

    def __post_init__(self) -> None:
        assert self.a.ndim == 2 and self.b.ndim == 2, "a and b are matrices"
        assert self.b.shape[1] == self.a.shape[0], "b (m, r) and a (r, n) share r"

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def in_features(self) -> int:
        return self.a.shape[1]

    @property
    def out_features(self) -> int:
        return self.b.shape[0]

    def delta(self) -> Tensor:
        """The dense update ``b @ a`` (m, n). Only the full-space baseline and tests call this."""
        return self.b @ self.a  # (m, n)


@dataclass(frozen=True)
class LowRank:
    """A merged module as LoRA factors with scale 1: ``delta = b @ a``.

    ``energy_kept`` is the share of the squared Frobenius norm kept by an
    optional truncation to a smaller rank (1.0 when nothing was cut, None when
    no truncation was asked for).
    """

    a: Tensor  # (q, n)
    b: Tensor  # (m, q)
    energy_kept: float | None = None

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self) -> Tensor:
        return self.b @ self.a  # (m, n)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "LowRank":
        return LowRank(a=self.a.to(device=device, dtype=dtype), b=self.b.to(device=device, dtype=dtype),
                       energy_kept=self.energy_kept)
