"""A whole merge of PEFT adapters: options, per-module work, the report.

This is the one place that turns adapter directories into a merged adapter. The
``coremerge merge`` command calls :func:`merge_to_dir`; the Ray pipeline calls
:func:`merge_module_of` shard by shard and :func:`finish` to write the same directory.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from coremerge import methods, peft_io
from coremerge.paths import check_output_not_input
from coremerge.linalg import rank_for_energy
from coremerge.spaces import CoreSpace, check_space, merge_module, module_generator, written_spectrum
from coremerge.types import FactoredLowRank, LowRank, StoredLowRank

log = logging.getLogger(__name__)

DTYPES: Mapping[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16,
}


def parse_dtype(name: str, *, what: str = "dtype") -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown {what} {name!r}; expected one of: {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class MergeOptions:
    """Everything that decides the merged tensors (and nothing about files).

    ``weights`` has one entry per adapter (default: all 1). ``params`` holds the method's
    hyper-parameters; :meth:`checked` fills in the defaults and refuses unknown ones.
    """

    method: str = "ta"
    space: str = "core"
    alpha: float = 1.0
    weights: tuple[float, ...] | None = None
    params: Mapping[str, object] = field(default_factory=dict)
    rank: int | None = None
    seed: int = 0
    compute_dtype: torch.dtype = torch.float32
    device: str = "cpu"

    def checked(self, num_adapters: int) -> "MergeOptions":
        """A validated copy with the method's defaults filled in; ValueError on bad values."""
        check_space(self.space)
        params = methods.check_params(self.method, self.params)
        if not _is_number(self.alpha):
            raise ValueError(f"alpha must be a finite number, got {self.alpha!r}")
        weights = (1.0,) * num_adapters if self.weights is None else tuple(self.weights)
        if len(weights) != num_adapters:
            raise ValueError(f"got {len(weights)} weights for {num_adapters} adapters; give one per adapter")
        if not all(_is_number(w) for w in weights):
            raise ValueError(f"weights must be finite numbers, got {list(weights)}")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.compute_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"compute dtype must be float32 or float64, got {dtype_name(self.compute_dtype)}")
        check_device(self.device)
        return replace(self, params=params, weights=tuple(float(w) for w in weights), alpha=float(self.alpha))

    def describe(self) -> dict[str, object]:
        """The options as plain JSON values, for merge_report.json."""
        return {
            "method": self.method, "space": self.space, "alpha": self.alpha, "params": dict(self.params),
            "weights": list(self.weights) if self.weights is not None else None, "rank": self.rank,
            "seed": self.seed, "compute_dtype": dtype_name(self.compute_dtype), "device": str(self.device),
        }


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


_DEVICE = re.compile(r"cpu|cuda(?::(\d{1,4}))?")


def check_device(device: object) -> None:
    """Refuse any device but ``cpu``, ``cuda`` and ``cuda:N`` with N a CUDA device torch sees (ValueError).

    Example:
        >>> check_device("meta")
        Traceback (most recent call last):
        ValueError: unknown device 'meta'; expected cpu, cuda or cuda:N
    """
    match = _DEVICE.fullmatch(device) if isinstance(device, str) else None
    if match is None:
        raise ValueError(f"unknown device {device!r}; expected cpu, cuda or cuda:N")
    if device == "cpu":
        return
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but torch sees no CUDA device; use --device cpu")
    count = torch.cuda.device_count()
    if match.group(1) is not None and int(match.group(1)) >= count:
        raise ValueError(f"device {device!r} was asked for, but torch sees {count} CUDA device(s): "
                         f"cuda:0 to cuda:{count - 1}")


def present_in(sources: Sequence[peft_io.AdapterSource], module: str) -> list[int]:
    """Indices of the adapters that have ``module`` (the others are left out of its merge)."""
    return [i for i, src in enumerate(sources) if module in src.modules]


def build_core_space(sources: Sequence[peft_io.AdapterSource], module: str, *,
                     compute_dtype: torch.dtype = torch.float32, device: str = "cpu") -> CoreSpace:
    """Read one module's factors from every adapter that has it and build its core space."""
    factors = [peft_io.load_factors(sources[i], module, dtype=compute_dtype, device=device)
               for i in present_in(sources, module)]
    return CoreSpace.build(factors)


def merge_module_of(sources: Sequence[peft_io.AdapterSource], module: str, options: MergeOptions, *,
                    core_space: CoreSpace | None = None, cores: dict[tuple, Tensor | None] | None = None,
                    factored: bool = False) -> LowRank | FactoredLowRank:
    """Merge one module of the adapters; ``options`` must come from :meth:`MergeOptions.checked`.

    A sweep passes what it shares between its merges of this module: ``core_space``, built
    once for the same adapters (the reference bases and core matrices), and ``cores``, a dict
    it keeps for this module, where each merged core matrix is stored at alpha = 1 and reused
    by every merge that differs only in alpha (the result is bit for bit the same).
    With ``factored``, a core-space merge of a nonzero module returns :class:`FactoredLowRank`
    (whose ``.expand()`` is the LowRank returned otherwise), so that the sweep can store the
    shared bases once. The result stays on ``options.device`` in the compute dtype.
    """
    present = present_in(sources, module)
    weights = [options.weights[i] for i in present]
    method = methods.get_method(options.method)
    generator = module_generator(options.seed, module) if method.random else None
    if options.space == "core":
        space = core_space or build_core_space(sources, module, compute_dtype=options.compute_dtype,
                                               device=options.device)
        core = merged_core_of(space, module, options, weights, cores)
        if factored:
            return space.factored(core, alpha=options.alpha, rank=options.rank)
        return space.lowrank(core, alpha=options.alpha, rank=options.rank)
    factors = [peft_io.load_factors(sources[i], module, dtype=options.compute_dtype, device=options.device)
               for i in present]
    return merge_module(factors, method=options.method, space=options.space, weights=weights,
                        alpha=options.alpha, params=options.params, generator=generator, rank=options.rank)


def merged_core_of(space: CoreSpace, module: str, options: MergeOptions, weights: Sequence[float],
                   cores: dict[tuple, Tensor | None] | None = None) -> Tensor | None:
    """The merged core of ``module`` at alpha = 1 (:meth:`CoreSpace.merge_core`) for ``options`` and the
    weights of the adapters that have the module; looked up in, or stored into, a sweep's ``cores``."""
    method = methods.get_method(options.method)
    key = (options.method, tuple(weights), tuple(sorted(options.params.items())),
           options.seed if method.random else None)
    if cores is not None and key in cores:
        return cores[key]
    generator = module_generator(options.seed, module) if method.random else None
    core = space.merge_core(options.method, weights=weights, params=options.params, generator=generator)
    if cores is not None:
        cores[key] = core
    return core


def output_dtype(sources: Sequence[peft_io.AdapterSource], requested: torch.dtype | None) -> torch.dtype:
    """The requested dtype, else the inputs' (float32 when they differ, float64 if one is)."""
    if requested is not None:
        return requested
    dtypes = {src.dtype for src in sources}
    if len(dtypes) == 1:
        return dtypes.pop()
    return torch.float64 if torch.float64 in dtypes else torch.float32


def open_all(specs: Sequence[str | Path]) -> list[peft_io.AdapterSource]:
    """Open and validate every adapter (headers only) and check they can be merged together."""
    if not specs:
        raise ValueError("no adapters given; name at least one adapter directory or hub id")
    sources = [peft_io.open_adapter(spec) for spec in specs]
    peft_io.check_compatible(sources)
    return sources


FACTOR_ENERGY = 0.99  # the share of a module's energy the oversize figures' --rank keeps


def oversized_factors(merged: Mapping[str, LowRank | StoredLowRank], *, space: str, truncated: bool,
                      dtype: torch.dtype) -> dict[str, object]:
    """The merged modules whose LoRA factors take more bytes than their dense update would.

    A module of rank q writes q (m + n) values, its dense update m n: a full-space merge has a rank
    up to min(m, n) (TIES, DARE, Iso-CTS and the literal methods fill the spectrum there), a
    core-space merge rank k = Σ r_t, more than m n / (m + n) when many adapters meet a small module.
    Returns how many such modules there are, their ``factor_bytes`` as written in ``dtype`` and their
    ``dense_bytes``, and ``rank_for_99pct_energy``: the smallest ``--rank`` whose truncation keeps at
    least 99% of the squared Frobenius norm of every one of them (None when there are none), from
    the singular values the factors carry (:func:`coremerge.spaces.written_spectrum`: no m x n matrix,
    no second m x n SVD).
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    over = [lr for lr in merged.values()
            if lr.rank * (lr.out_features + lr.in_features) > lr.out_features * lr.in_features]
    rank = 0
    for lr in over:
        s = written_spectrum(lr.load().to(dtype=dtype), space=space, truncated=truncated)  # (q,), as written
        rank = max(rank, rank_for_energy(s, FACTOR_ENERGY))
    return {
        "modules": len(over),
        "factor_bytes": sum(lr.rank * (lr.out_features + lr.in_features) for lr in over) * itemsize,
        "dense_bytes": sum(lr.out_features * lr.in_features for lr in over) * itemsize,
        "rank_for_99pct_energy": max(1, rank) if over else None,
    }


def oversize_warning(figures: Mapping[str, object], num_modules: int) -> str | None:
    """One line for the user from :func:`oversized_factors`' figures; None when no module is oversized.

    Example:
        >>> oversize_warning({"modules": 2, "factor_bytes": 17_400_000, "dense_bytes": 12_700_000,
        ...                   "rank_for_99pct_energy": 31}, 4)  # doctest: +ELLIPSIS
        '2 of 4 merged modules are written as LoRA factors larger than their dense update: 17.4 MB ...'
    """
    if not figures["modules"]:
        return None
    return (f"{figures['modules']} of {num_modules} merged modules are written as LoRA factors larger than their "
            f"dense update: {_size(figures['factor_bytes'])} of factors where the dense updates take "
            f"{_size(figures['dense_bytes'])}; --rank {figures['rank_for_99pct_energy']} keeps 99% of the energy "
            f"of each of them (merge_report.json: factors_larger_than_dense)")


def _size(num_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"


def build_report(sources: Sequence[peft_io.AdapterSource], options: MergeOptions,
                 merged: Mapping[str, LowRank | StoredLowRank], *, out_dtype: torch.dtype,
                 timings: Mapping[str, float], oversize: Mapping[str, object] | None = None) -> dict[str, object]:
    """merge_report.json: what went in, how it was merged, what came out.

    ``oversize``: :func:`oversized_factors` of ``merged``, when the caller has computed it already.
    """
    from coremerge import __version__

    if oversize is None:
        oversize = oversized_factors(merged, space=options.space, truncated=options.rank is not None,
                                     dtype=out_dtype)
    return {
        "coremerge_version": __version__,
        "inputs": [
            {"adapter": src.name, "path": str(src.path), "weights_file": src.weights_file.name,
             "sha256": peft_io.weights_sha256(src), "peft_type": src.peft_type,
             "modules": len(src.modules), "dtype": dtype_name(src.dtype)}
            for src in sources
        ],
        **options.describe(),
        "output_dtype": dtype_name(out_dtype),
        "modules": {
            name: {"rank": lr.rank, "adapters": len(present_in(sources, name)),
                   **({"energy_kept": lr.energy_kept} if lr.energy_kept is not None else {})}
            for name, lr in sorted(merged.items())
        },
        "factors_larger_than_dense": dict(oversize),
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
    }


def finish(out_dir: str | Path, sources: Sequence[peft_io.AdapterSource], options: MergeOptions,
           merged: Mapping[str, LowRank | StoredLowRank], *, out_dtype: torch.dtype, timings: Mapping[str, float],
           force: bool = False, owned: Callable[[Path], bool] | None = None, staging: Path | None = None,
           oversize: Mapping[str, object] | None = None) -> Path:
    """Write the merged adapter directory (atomically) with its config and report.

    ``force``, ``owned`` and ``staging`` go to :func:`coremerge.peft_io.write_adapter`: which existing
    directory may be replaced, and a temp directory made beforehand by ``reserve_output``.
    ``oversize`` goes to :func:`build_report`.
    """
    config = peft_io.adapter_config_for(sources, {name: lr.rank for name, lr in merged.items()})
    started = time.perf_counter()
    report = build_report(sources, options, merged, out_dtype=out_dtype, timings=timings, oversize=oversize)
    timings = {**timings, "write": time.perf_counter() - started}
    report["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
    return peft_io.write_adapter(out_dir, merged, config=config, report=report, dtype=out_dtype, force=force,
                                 owned=owned, staging=staging)


def merge_to_dir(specs: Sequence[str | Path], out_dir: str | Path, options: MergeOptions, *,
                 dtype: torch.dtype | None = None, force: bool = False,
                 on_module: Callable[[str], None] | None = None) -> Path:
    """Merge the adapters named by ``specs`` into a PEFT adapter directory ``out_dir``.

    Everything is validated before any work: the adapters, the options, and ``out_dir``, which must
    not be, contain or lie inside an input adapter (:func:`coremerge.paths.check_output_not_input`),
    may exist only with ``force`` and only as a merged adapter this tool wrote or an empty directory,
    and must be writable (its temp directory is made before the merge is computed). Leftovers of
    writers of ``out_dir`` that died on this host are removed first. Nothing is written unless the
    whole merge succeeded. ``on_module`` is called after each merged module (progress bars).
    When some modules' factors are larger than their dense updates would be, one warning says how
    many, their bytes, and the ``--rank`` that keeps 99% of their energy (:func:`oversized_factors`).

    Example:
        >>> merge_to_dir(["a/", "b/"], "merged/", MergeOptions(method="tsv", alpha=0.9))  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    check_output_not_input(out_dir, specs)  # local paths as given: before anything is read or downloaded
    peft_io.check_output(out_dir, force=force)
    sources = open_all(specs)
    check_output_not_input(out_dir, sources)  # and where they really are (Hub ids: the local cache)
    options = options.checked(len(sources))
    out_dtype = output_dtype(sources, dtype)
    peft_io.clean_dead_leftovers(out_dir)
    staging = peft_io.reserve_output(out_dir, force=force)
    try:
        t1 = time.perf_counter()
        merged: dict[str, LowRank] = {}
        for module in peft_io.union_modules(sources):
            merged[module] = merge_module_of(sources, module, options).to(dtype=out_dtype, device="cpu")
            if on_module is not None:
                on_module(module)
        t2 = time.perf_counter()
        log.info("merged %d modules of %d adapters in %.2f s", len(merged), len(sources), t2 - t1)
        oversize = oversized_factors(merged, space=options.space, truncated=options.rank is not None,
                                     dtype=out_dtype)
        out = finish(out_dir, sources, options, merged, out_dtype=out_dtype,
                     timings={"open": t1 - t0, "merge": t2 - t1}, force=force, staging=staging, oversize=oversize)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    warning = oversize_warning(oversize, len(merged))
    if warning is not None:
        log.warning(warning)
    return out
