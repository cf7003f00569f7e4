"""The merge methods: one explicit registry, validated hyper-parameters, one call to apply them.

Every method is a pure function ``merge(tasks, *, alpha=1.0, <hyper-parameters>) -> Tensor``
taking a (T, p, q) stack of task matrices (per-adapter weights already multiplied in) and
returning the (p, q) merge. The same functions serve core matrices, dense updates and
KnOTS' per-task factors.

Example:
    >>> tasks = torch.randn(3, 4, 4)
    >>> check_params("ties", {"density": 0.5})
    {'density': 0.5}
    >>> apply("ties", tasks, alpha=0.7, params={"density": 0.5}).shape
    torch.Size([4, 4])
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import Tensor

from coremerge.methods import cart, dare, iso, ta, ties, tsv
from coremerge.methods._common import check_common_fraction, check_density, check_finite

# Keywords every space passes itself; they are not user-facing hyper-parameters.
_PLUMBING = frozenset({"alpha", "generator", "task_ranks"})

# How each user-facing hyper-parameter is checked (and normalised to float).
_CHECKS: Mapping[str, Callable[[object], float]] = MappingProxyType({
    "density": check_density,
    "ties_density": lambda value: check_density(value, "ties_density"),
    "common_fraction": check_common_fraction,
    "lam": lambda value: check_finite(value, "lam"),
})


@dataclass(frozen=True)
class Method:
    """A registered merge method.

    ``hyperparams`` maps the user-facing hyper-parameters to their defaults, read from
    ``fn``'s signature (alpha, generator and task_ranks excluded). ``random``: needs a
    generator. ``uses_task_ranks``: takes each task's rank (tsv).
    """

    name: str
    fn: Callable[..., Tensor]
    hyperparams: Mapping[str, object]
    random: bool
    uses_task_ranks: bool


def _method(name: str, fn: Callable[..., Tensor]) -> Method:
    params = inspect.signature(fn).parameters
    hyper = {key: p.default for key, p in params.items()
             if p.kind is inspect.Parameter.KEYWORD_ONLY and key not in _PLUMBING}
    unchecked = set(hyper) - set(_CHECKS)
    assert not unchecked, f"{name}: hyper-parameters without a check: {sorted(unchecked)}"
    return Method(name=name, fn=fn, hyperparams=MappingProxyType(hyper), random="generator" in params,
                  uses_task_ranks="task_ranks" in params)


def _registry(*entries: tuple[str, Callable[..., Tensor]]) -> Mapping[str, Method]:
    table: dict[str, Method] = {}
    for name, fn in entries:
        if name in table:
            raise ValueError(f"merge method {name!r} is registered twice")
        table[name] = _method(name, fn)
    return MappingProxyType(table)


METHODS: Mapping[str, Method] = _registry(
    ("ta", ta.merge),
    ("ties", ties.merge),
    ("dare", dare.merge),
    ("dare_ties", dare.merge_ties),
    ("tsv", tsv.merge),
    ("iso_c", iso.merge_c),
    ("iso_cts", iso.merge_cts),
    ("cart", cart.merge),
    # the Core Space paper's code's literal versions, null-space directions included: only to
    # reproduce its full-space baselines (README, "Where coremerge differs from the reference code")
    ("tsv_literal", tsv.merge_literal),
    ("iso_c_literal", iso.merge_c_literal),
)


def get_method(name: str) -> Method:
    """The registered method called ``name``.

    Example:
        >>> get_method("dare").random
        True
    """
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"unknown merge method {name!r}; expected one of: {', '.join(METHODS)}")
    return METHODS[name]


def check_params(name: str, params: Mapping[str, object] | None) -> dict[str, object]:
    """Validate ``params`` for method ``name``; return every hyper-parameter, defaults filled in.

    Example:
        >>> check_params("cart", {"lam": 2})
        {'density': 0.04, 'lam': 2.0}
    """
    method = get_method(name)
    params = {} if params is None else params
    if not isinstance(params, Mapping):
        raise ValueError(f"params of merge method {name!r} must be a mapping of name -> value, got {params!r}")
    unknown = sorted(str(key) for key in params if key not in method.hyperparams)
    if unknown:
        valid = ", ".join(method.hyperparams) or "none"
        raise ValueError(f"unknown hyper-parameter(s) {', '.join(unknown)} for merge method {name!r}; "
                         f"valid hyper-parameters: {valid}")
    checked = dict(method.hyperparams)
    for key, value in params.items():
        try:
            checked[key] = _CHECKS[key](value)
        except ValueError as err:
            raise ValueError(f"merge method {name!r}: {err}") from None
    return checked


def apply(name: str, tasks: Tensor, *, alpha: float = 1.0, params: Mapping[str, object] | None = None,
          task_ranks: Sequence[int] | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Merge a (T, p, q) stack with method ``name``; returns (p, q).

    ``generator`` is passed only to random methods (required there), ``task_ranks`` only to
    methods that use them; both are ignored otherwise.

    Example:
        >>> apply("ta", torch.ones(2, 3, 3), alpha=0.5)[0, 0]
        tensor(1.)
    """
    method = get_method(name)
    hyper = check_params(name, params)
    kwargs: dict[str, object] = {"alpha": check_finite(alpha, "alpha"), **hyper}
    if method.random:
        kwargs["generator"] = generator
    if method.uses_task_ranks:
        kwargs["task_ranks"] = task_ranks
    return method.fn(tasks, **kwargs)  # (p, q)


__all__ = ["METHODS", "Method", "apply", "check_params", "get_method"]
