"""Plain data types shared by the math, the PEFT I/O and the pipeline.

Everything here is tensors and numbers: no files, no scales to interpret.
A LoRA update of one linear layer W (m x n) is ``delta = b @ a`` with the
adapter's scale already folded into ``b`` (peft_io does that, once).
"""

from __future__ import annotations

from collections.abc import Callable
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

    @property
    def in_features(self) -> int:
        return self.a.shape[1]

    @property
    def out_features(self) -> int:
        return self.b.shape[0]

    def load(self) -> "LowRank":
        """Itself (the interface it shares with :class:`StoredLowRank`)."""
        return self

    def delta(self) -> Tensor:
        return self.b @ self.a  # (m, n)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "LowRank":
        return LowRank(a=self.a.to(device=device, dtype=dtype), b=self.b.to(device=device, dtype=dtype),
                       energy_kept=self.energy_kept)


@dataclass(frozen=True)
class FactoredLowRank:
    """A merged core-space module one multiplication before its LoRA factors: ``delta = u @ x @ y @ v``.

    ``u`` (m, ku) and ``v`` (kv, n) are the module's reference bases, the same for every merge of
    one adapter set; ``x`` (ku, q) and ``y`` (q, kv) are this merge's own small factors (``y`` None:
    ``delta = u @ x @ v``, nothing truncated). A sweep stores the bases once and each member's small
    factors; :meth:`expand` gives the LoRA factors, the very tensors ``coremerge merge`` computes
    (it calls the same method).

    Example:
        >>> u, v = torch.eye(4)[:, :2], torch.eye(2, 5)
        >>> f = FactoredLowRank(u=u, x=2 * torch.eye(2), y=None, v=v)
        >>> f.expand().delta().tolist()[0]
        [2.0, 0.0, 0.0, 0.0, 0.0]
    """

    u: Tensor  # (m, ku)
    x: Tensor  # (ku, q)
    y: Tensor | None  # (q, kv), or None: q = kv and a = v
    v: Tensor  # (kv, n)
    energy_kept: float | None = None

    @property
    def rank(self) -> int:
        return self.x.shape[1]

    @property
    def in_features(self) -> int:
        return self.v.shape[1]

    @property
    def out_features(self) -> int:
        return self.u.shape[0]

    def expand(self) -> LowRank:
        """LoRA factors with scale 1: ``b = u @ x`` (m, q), ``a = y @ v`` or ``v`` (q, n)."""
        a = self.v if self.y is None else self.y @ self.v
        return LowRank(a=a, b=self.u @ self.x, energy_kept=self.energy_kept)


@dataclass(frozen=True)
class StoredLowRank:
    """A merged module that stays on disk until it is written: its shape now, its factors on demand.

    ``peft_io.write_adapter`` takes these where it takes :class:`LowRank`, and loads one module at
    a time, so a merged adapter larger than memory (a 70B model's) streams from the files that hold
    its modules into the output file.

    Example:
        >>> lr = LowRank(a=torch.ones(2, 5), b=torch.ones(3, 2))
        >>> s = StoredLowRank(rank=2, in_features=5, out_features=3, energy_kept=None, loader=lambda: lr)
        >>> s.load() is lr
        True
    """

    rank: int
    in_features: int
    out_features: int
    energy_kept: float | None
    loader: Callable[[], LowRank]

    def load(self) -> LowRank:
        lr = self.loader()
        expected = (self.rank, self.in_features, self.out_features)
        if (lr.rank, lr.in_features, lr.out_features) != expected:
            raise ValueError(f"stored module holds rank/in/out {(lr.rank, lr.in_features, lr.out_features)}, "
                             f"expected {expected}")
        return lr
