"""What an adapter set's core matrices show before a merge: spectra, alignment, truncation.

Every figure of a module's update ``ΔW_t = U · M_t · V`` is the same figure of its core matrix
``M_t`` (ku, kv), because the reference bases U and V are isometries (PAPER.md): singular values,
Frobenius norms and inner products agree, and the left singular vectors of ``ΔW`` are ``U`` times
those of its core. So a whole adapter set is analysed from k x k matrices, milliseconds per module;
no m x n matrix is formed, except by ``full=True``, which merges the dense updates (what a
full-space merge is) to show what the space changes.

The figures, per module (one row per module, merge and task in :attr:`Analysis.rows`):

- **Spectra and density.** The singular values of each task's update and of the merge, and the
  *energy rank* at a share ``p`` (0.9, 0.95, 0.99): the fewest components whose squared singular
  values hold ``p`` of ``‖·‖²_F``. ``k`` is the sum of the adapters' ranks: the size of core space.
- **Subspace alignment** (Marczak et al., 2025, arXiv 2502.04959): ``SAR_t = ‖Π ΔW_t‖_F / ‖ΔW_t‖_F``,
  with ``Π`` the projection on the merge's top ``k_M`` left singular vectors and ``k_M`` the merge's
  energy rank at ``sar_energy`` (default 0.95). That paper picks ``k_M`` as the fewest directions
  whose residual ``‖ΔW_M - Π ΔW_M‖_F`` is at most ``ε ‖ΔW_M‖_F``: ``sar_energy = 1 - ε²``.
  A task merged alone has ``SAR = sqrt(share of its energy in its top k_M directions)``, which is
  at least ``sqrt(sar_energy)``, and exactly 1 with ``sar_energy = 1`` (every non-zero direction).
- **Interference.** Between every two tasks: the cosine of their updates
  ``⟨ΔW_s, ΔW_t⟩_F / (‖ΔW_s‖_F ‖ΔW_t‖_F)``, and the overlap of their column spaces
  ``‖P_sᵀ P_t‖²_F / min(r_s, r_t)`` (the mean squared cosine of their principal angles: 0 for
  orthogonal subspaces, 1 when one contains the other).
- **Truncation.** The relative error ``‖ΔW - ΔW_q‖_F / ‖ΔW‖_F`` of the merge kept at rank q (the best
  rank-q approximation, what ``coremerge merge --rank q`` writes), for q = 1 .. k.

Example:
    >>> result = analyze(["adapters/snli", "adapters/mnli"], [MergeOptions(method="tsv")])  # doctest: +SKIP
    >>> write_report(result, "report/")                                                     # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from coremerge import methods, peft_io
from coremerge.linalg import one_thread_if_small, rank_for_energy, rank_tolerance, svd, thin_svd
from coremerge.merge import MergeOptions, dtype_name, merged_core_of, open_all, present_in
from coremerge.paths import check_output_not_input
from coremerge.spaces import CoreSpace, module_generator

ENERGY_SHARES = (0.9, 0.95, 0.99)
DEFAULT_METHODS = ("ta", "ties", "tsv", "iso_c")
SUMMARY_NAME, TABLE_NAME, JSON_NAME = "summary.md", "analysis.parquet", "analysis.json"
PLOTS = ("alignment.png", "spectra.png", "truncation.png")


# ----------------------------------------------------------------------------- figures of spectra


energy_rank = rank_for_energy  # the fewest leading components holding a share of the energy (coremerge.linalg)


def truncation_errors(s: Tensor, length: int) -> list[float]:
    """``‖X - X_q‖_F / ‖X‖_F`` of the best rank-q approximation of a matrix with singular values ``s``,
    for q = 1 .. ``length`` (0 once q reaches the rank; all 0 for a zero matrix).

    Example:
        >>> truncation_errors(torch.tensor([3.0, 4.0]), 3)   # sqrt(16 / 25), then exact
        [0.8, 0.0, 0.0]
    """
    e = s.to(torch.float64) ** 2
    total = float(e.sum())
    if total == 0.0:
        return [0.0] * length
    tails = e.flip(0).cumsum(0).flip(0)  # tails[i] = Σ_{j >= i} e_j, summed from the small end: exactly 0 at the end
    errors = [math.sqrt(float(t) / total) for t in tails[1:]] + [0.0] * length
    return errors[:length]


def alignment(directions: Tensor, tasks: Tensor) -> list[float]:
    """``‖Pᵀ X_t‖_F / ‖X_t‖_F`` for each task ``X_t`` of ``tasks`` (T, p, q), ``directions`` P (p, d) with
    orthonormal columns: the share of each task's norm in span(P). NaN for a zero task.

    The same function serves core space (P in core coordinates, X_t the cores) and full space (P in
    R^m, X_t the dense updates).
    """
    projected = torch.linalg.matrix_norm(directions.T.unsqueeze(0) @ tasks)  # (T,)
    norms = torch.linalg.matrix_norm(tasks)  # (T,)
    return [float(p / n) if n > 0 else math.nan for p, n in zip(projected, norms)]


def overlaps(tasks: Tensor, columns: Sequence[Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """(cosine, subspace overlap), each (T, T), of the tasks (T, p, q); see the module's doc.
    ``columns``: orthonormal columns spanning each task's column space, if the caller has them.
    Rows and columns of a zero task are NaN."""
    num = tasks.shape[0]
    flat = tasks.reshape(num, -1)  # (T, p q)
    norms = flat.norm(dim=1)  # (T,)
    cosine = (flat @ flat.T) / (norms[:, None] * norms[None, :])  # (T, T); 0/0 -> NaN for zero tasks
    if columns is None:
        columns = [thin_svd(t)[0] for t in tasks]  # each (p, r_t): orthonormal columns spanning col(X_t)
    subspace = torch.full((num, num), math.nan, dtype=tasks.dtype)
    for s in range(num):
        for t in range(num):
            r = min(columns[s].shape[1], columns[t].shape[1])
            if r > 0:
                subspace[s, t] = torch.linalg.matrix_norm(columns[s].T @ columns[t]) ** 2 / r
    return cosine, subspace


@dataclass(frozen=True)
class MergeFigures:
    """One merged module's spectrum and what follows from it, and its top left singular directions."""

    sv: Tensor  # (d,): the non-zero singular values, descending
    directions: Tensor  # (p, k_M): the left singular vectors that SAR projects on
    energy_ranks: tuple[int, ...]  # one per ENERGY_SHARES

    @classmethod
    def of(cls, merged: Tensor | None, *, rows: int, sar_energy: float,
           dtype: torch.dtype = torch.float64) -> "MergeFigures":
        if merged is None:  # every update of the module is zero
            empty = torch.zeros(0, dtype=dtype)
            return cls(sv=empty, directions=torch.zeros(rows, 0, dtype=dtype), energy_ranks=(0,) * 3)
        u, s, _ = thin_svd(merged)  # (p, d), (d,): in the merge's dtype (the compute dtype)
        return cls(sv=s, directions=u[:, :energy_rank(s, sar_energy)],
                   energy_ranks=tuple(energy_rank(s, p) for p in ENERGY_SHARES))


# ----------------------------------------------------------------------------- one module


@dataclass(frozen=True)
class MergeSpec:
    """A merge to analyse: a label (its column value) and the options ``coremerge merge`` takes."""

    label: str
    options: MergeOptions  # checked (MergeOptions.checked): weights per adapter, params filled in


def layer_and_kind(module: str) -> tuple[int | None, str]:
    """The layer index (the last all-digit part of the module's name) and what follows it.

    Example:
        >>> layer_and_kind("base_model.model.model.layers.12.self_attn.q_proj")
        (12, 'self_attn.q_proj')
        >>> layer_and_kind("lm_head")
        (None, 'lm_head')
    """
    parts = module.split(".")
    index = max((i for i, part in enumerate(parts) if part.isdigit()), default=None)
    if index is None:
        return None, module
    return int(parts[index]), ".".join(parts[index + 1:]) or module


def analyze_module(module: str, space: CoreSpace, task_names: Sequence[str], merges: Sequence[MergeSpec],
                   weights: Mapping[str, Sequence[float]], *, sar_energy: float = 0.95,
                   deltas: Tensor | None = None,
                   cores: dict[tuple, Tensor | None] | None = None) -> list[dict[str, object]]:
    """The rows of one module: one per merge and task. ``space`` holds the adapters that have the module
    (named ``task_names``, weighted ``weights[label]`` for each merge); ``deltas`` (T, m, n), their dense
    updates, adds the full-space columns (the same method merged in full space). ``cores`` is a sweep's
    cache of merged cores (:func:`coremerge.merge.merged_core_of`): a core merged already is not merged
    again."""
    with one_thread_if_small(*space.cores.shape[1:]):  # k x k work: threads would only wait on each other
        return _analyze_module(module, space, task_names, merges, weights, sar_energy, deltas, cores)


def _analyze_module(module: str, space: CoreSpace, task_names: Sequence[str], merges: Sequence[MergeSpec],
                    weights: Mapping[str, Sequence[float]], sar_energy: float, deltas: Tensor | None,
                    cores: dict[tuple, Tensor | None] | None) -> list[dict[str, object]]:
    tasks = space.cores  # (T, ku, kv), in the compute dtype (float32 by default, as the merge itself)
    left, sv, _ = svd(tasks)  # one batched SVD: (T, ku, d), (T, d)
    task_spectra, columns = [], []
    for t, rank in enumerate(space.ranks):  # a task's core has its adapter's rank at most
        kept = min(rank, int((sv[t] > rank_tolerance(sv[t], tuple(tasks.shape[1:]))).sum()))
        task_spectra.append(sv[t, :rank])
        columns.append(left[t, :, :kept])
    cosine, subspace = overlaps(tasks, columns)
    layer, kind = layer_and_kind(module)
    m, n = space.basis.u.shape[0], space.basis.v.shape[1]
    k = sum(space.ranks)
    rows = []
    for merge in merges:
        options = merge.options
        core = merged_core_of(space, module, options, weights[merge.label], cores)  # (ku, kv) at alpha 1, or None
        merged = None if core is None else options.alpha * core
        figures = MergeFigures.of(merged, rows=tasks.shape[1], sar_energy=sar_energy, dtype=tasks.dtype)
        sar = alignment(figures.directions, tasks)
        full: dict[str, object] = {}
        if deltas is not None:
            full = _full_space(module, deltas, merge, weights[merge.label], sar_energy)
        for t, name in enumerate(task_names):
            others = [i for i in range(len(task_names)) if i != t]
            rows.append({
                "module": module, "layer": layer, "kind": kind, "out_features": m, "in_features": n, "k": k,
                "merge": merge.label, "method": options.method, "alpha": options.alpha,
                "task": name, "task_rank": space.ranks[t], "task_norm": float(tasks[t].norm()),
                "task_sv": task_spectra[t].tolist(),
                **{f"task_rank_{_pct(p)}": energy_rank(task_spectra[t], p) for p in ENERGY_SHARES},
                "other_tasks": [task_names[i] for i in others],
                "cosine": [float(cosine[t, i]) for i in others],
                "subspace_overlap": [float(subspace[t, i]) for i in others],
                "sar": sar[t], "sar_k": figures.directions.shape[1],
                "merged_sv": figures.sv.tolist(), "merged_rank": figures.sv.shape[0],
                **{f"merged_rank_{_pct(p)}": r for p, r in zip(ENERGY_SHARES, figures.energy_ranks)},
                "truncation_error": truncation_errors(figures.sv, k),
                **({key: (value[t] if key == "sar_full" else value) for key, value in full.items()}),
            })
    return rows


def _full_space(module: str, deltas: Tensor, merge: MergeSpec, weights: Sequence[float],
                sar_energy: float) -> dict[str, object]:
    """The full-space columns: the same method on the dense updates (T, m, n), as ``--space full`` merges."""
    options = merge.options
    method = methods.get_method(options.method)
    generator = module_generator(options.seed, module) if method.random else None
    w = torch.as_tensor(list(weights), dtype=deltas.dtype)
    dense = methods.apply(options.method, deltas * w[:, None, None], alpha=options.alpha, params=options.params,
                          task_ranks=None, generator=generator)  # (m, n)
    figures = MergeFigures.of(dense, rows=deltas.shape[1], sar_energy=sar_energy, dtype=deltas.dtype)
    sar = [alignment(figures.directions, deltas[t:t + 1])[0] for t in range(deltas.shape[0])]
    return {"sar_full": sar,
            "sar_full_k": figures.directions.shape[1], "full_merged_sv": figures.sv.tolist(),
            "full_merged_rank": figures.sv.shape[0],
            **{f"full_merged_rank_{_pct(p)}": r for p, r in zip(ENERGY_SHARES, figures.energy_ranks)}}


def _pct(share: float) -> str:
    return f"{round(share * 100)}"


# ----------------------------------------------------------------------------- a whole adapter set


@dataclass(frozen=True)
class Analysis:
    """An adapter set analysed: its rows (see the module's doc) and what was asked."""

    tasks: tuple[str, ...]  # one name per adapter, unique
    adapters: tuple[dict[str, object], ...]  # name, path, peft_type, modules, ranks
    merges: tuple[MergeSpec, ...]
    sar_energy: float
    full: bool
    rows: tuple[dict[str, object], ...]
    seconds: float | None  # None: gathered from a job's shards (python -m pipeline report)
    notes: tuple[str, ...] = ()  # what the summary should say besides the figures (what is missing)


def task_names(sources: Sequence[peft_io.AdapterSource]) -> list[str]:
    """A short unique name per adapter: its directory's (or Hub id's) last part, numbered when two agree."""
    base = [Path(str(src.name).rstrip("/")).name or str(src.name) for src in sources]
    return [name if base.count(name) == 1 else f"{name}#{i}" for i, name in enumerate(base)]


def merge_specs(methods_: Sequence[str], *, alpha: float = 1.0, weights: Sequence[float] | None = None,
                params: Mapping[str, object] | None = None, seed: int = 0,
                compute_dtype: torch.dtype = torch.float32, num_adapters: int) -> list[MergeSpec]:
    """One checked merge per method. Each hyper-parameter in ``params`` goes to the methods that take
    it; one that none of them takes is refused (ValueError), as is a method named twice."""
    if not methods_:
        raise ValueError("no merge method given; name at least one with --method")
    repeated = sorted({m for m in methods_ if list(methods_).count(m) > 1})
    if repeated:
        raise ValueError(f"merge method {repeated[0]!r} is given more than once")
    params = dict(params or {})
    takers = {key: [m for m in methods_ if key in methods.get_method(m).hyperparams] for key in params}
    unused = sorted(key for key, who in takers.items() if not who)
    if unused:
        raise ValueError(f"hyper-parameter {unused[0]!r} is taken by none of the methods {', '.join(methods_)}")
    specs = []
    for name in methods_:
        own = {key: value for key, value in params.items() if name in takers[key]}
        options = MergeOptions(method=name, alpha=alpha, weights=None if weights is None else tuple(weights),
                               params=own, seed=seed, compute_dtype=compute_dtype)
        specs.append(MergeSpec(label=name, options=options.checked(num_adapters)))
    return specs


def analyze(specs: Sequence[str | os.PathLike], merges: Sequence[MergeSpec], *, sar_energy: float = 0.95,
            full: bool = False, sources: Sequence[peft_io.AdapterSource] | None = None,
            on_module: Callable[[str], None] | None = None) -> Analysis:
    """Analyse every module of the adapters ``specs`` (opened and checked as ``coremerge merge`` does)
    for each merge of ``merges`` (from :func:`merge_specs`). ``full`` adds the full-space columns,
    which form every module's dense updates: O(T m n) memory and time per module."""
    if not 0.0 < sar_energy <= 1.0:
        raise ValueError(f"sar_energy must be a share in (0, 1], got {sar_energy!r}")
    started = time.perf_counter()
    sources = list(sources) if sources is not None else open_all(specs)
    names = task_names(sources)
    dtypes = {merge.options.compute_dtype for merge in merges}
    if len(dtypes) != 1:
        raise ValueError("every analysed merge must use one compute dtype")
    dtype = dtypes.pop()

    def one(module: str) -> list[dict[str, object]]:
        present = present_in(sources, module)
        factors = [peft_io.load_factors(sources[i], module, dtype=dtype) for i in present]
        space = CoreSpace.build(factors)
        weights = {merge.label: [merge.options.weights[i] for i in present] for merge in merges}
        deltas = torch.stack([f.delta() for f in factors]) if full else None  # (T, m, n)
        return analyze_module(module, space, [names[i] for i in present], merges, weights,
                              sar_energy=sar_energy, deltas=deltas)

    # Modules side by side, each on one torch thread: the work of a module is small decompositions and
    # thin products, which threads would only make wait on each other (and on a busy machine, on the
    # slowest core). With --full, one module at a time: its dense updates are the memory.
    modules = peft_io.union_modules(sources)
    workers = 1 if full else max(1, min(os.cpu_count() or 1, len(modules)))
    rows: list[dict[str, object]] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for module, module_rows in zip(modules, pool.map(one, modules)):  # in module order
                rows.extend(module_rows)
                if on_module is not None:
                    on_module(module)
    finally:
        torch.set_num_threads(threads)
    adapters = tuple({"name": name, "path": str(src.path), "peft_type": src.peft_type, "modules": len(src.modules),
                      "ranks": sorted({spec.rank for spec in src.modules.values()}), "dtype": dtype_name(src.dtype)}
                     for name, src in zip(names, sources))
    return Analysis(tasks=tuple(names), adapters=adapters, merges=tuple(merges), sar_energy=sar_energy, full=full,
                    rows=tuple(rows), seconds=time.perf_counter() - started)


# ----------------------------------------------------------------------------- summary


def _mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def summarize(analysis: Analysis) -> dict[str, object]:
    """The figures a script wants, as plain JSON values (what ``coremerge analyze --json`` prints; pass it
    through :func:`json_safe` for strict JSON: a figure of an all-zero module is NaN)."""
    from coremerge import __version__

    modules = sorted({row["module"] for row in analysis.rows})
    per_merge = []
    for merge in analysis.merges:
        rows = [row for row in analysis.rows if row["merge"] == merge.label]
        first = {}  # one row per module: the module-level figures
        sar_of_module: dict[str, list[float]] = {}
        for row in rows:
            first.setdefault(row["module"], row)
            sar_of_module.setdefault(row["module"], []).append(row["sar"])
        module_sar = {mod: _mean(values) for mod, values in sar_of_module.items()}
        by_task = {space: {task: _mean([r[key] for r in rows if r["task"] == task]) for task in analysis.tasks}
                   for space, key in (("core", "sar"), ("full", "sar_full")) if space == "core" or analysis.full}
        lowest = sorted(first, key=lambda mod: module_sar[mod] if module_sar[mod] is not None else 0.0)[:5]
        per_merge.append({
            "merge": merge.label, "method": merge.options.method, "alpha": merge.options.alpha,
            "params": dict(merge.options.params),
            "mean_sar": {"core": _mean([r["sar"] for r in rows]),
                         "full": _mean([r["sar_full"] for r in rows]) if analysis.full else None},
            "sar_by_task": {"core": by_task["core"], "full": by_task.get("full")},
            "rank_for_energy": {_pct(p): max((r[f"merged_rank_{_pct(p)}"] for r in first.values()), default=0)
                                for p in ENERGY_SHARES},
            "mean_rank_for_energy": {_pct(p): _mean([r[f"merged_rank_{_pct(p)}"] for r in first.values()])
                                     for p in ENERGY_SHARES},
            "lowest_alignment": [{"module": mod, "mean_sar": module_sar[mod]} for mod in lowest],
        })
    pairs = {}
    for row in analysis.rows:
        if row["merge"] != analysis.merges[0].label:
            continue
        for other, cos, sub in zip(row["other_tasks"], row["cosine"], row["subspace_overlap"]):
            if row["task"] < other:
                pairs[(row["module"], row["task"], other)] = (cos, sub)
    strongest = sorted(pairs.items(), key=lambda item: -abs(item[1][0]) if not math.isnan(item[1][0]) else 0)[:5]
    return {
        "coremerge_version": __version__, "kind": "analysis",
        "seconds": None if analysis.seconds is None else round(analysis.seconds, 3), "notes": list(analysis.notes),
        "adapters": list(analysis.adapters), "modules": len(modules), "sar_energy": analysis.sar_energy,
        "energy_shares": list(ENERGY_SHARES), "full_space": analysis.full, "methods": per_merge,
        "interference": {
            "mean_abs_cosine": _mean([abs(c) for c, _ in pairs.values()]),
            "mean_subspace_overlap": _mean([s for _, s in pairs.values()]),
            "strongest": [{"module": mod, "tasks": [a, b], "cosine": c, "subspace_overlap": s}
                          for (mod, a, b), (c, s) in strongest],
        },
    }


# ----------------------------------------------------------------------------- the report directory


def is_analysis_report(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a report directory :func:`write_report` wrote (its analysis.json says so)."""
    marker = Path(path) / JSON_NAME
    try:
        if Path(path).is_symlink() or marker.stat().st_size > (64 << 20):
            return False
        data = json.loads(marker.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("kind") == "analysis" and isinstance(data.get("coremerge_version"), str)


def _owned(path: Path) -> bool:
    return is_analysis_report(path) or peft_io.is_empty_dir(path)


def check_report_output(out: str | os.PathLike, *, force: bool = False) -> None:
    """Refuse (ValueError, one line) a report directory that may not be written: as
    :func:`coremerge.peft_io.check_output`, where what ``force`` may replace is a report this module
    wrote (or an empty directory)."""
    peft_io.check_output(out, force=force, owned=_owned)


def table(analysis: Analysis):
    """The rows as a pyarrow Table (list columns for spectra and curves)."""
    import pyarrow as pa

    columns: dict[str, list] = {}
    for row in analysis.rows:
        for key in row:
            columns.setdefault(key, [])
    for row in analysis.rows:
        for key, values in columns.items():
            values.append(row.get(key))
    return pa.table(columns)


def write_report(analysis: Analysis, out: str | os.PathLike, *, force: bool = False,
                 inputs: Sequence[object] = ()) -> dict[str, object]:
    """Write ``out/``: analysis.parquet, summary.md, analysis.json and the PNG plots, atomically (a temp
    directory renamed into place). An existing ``out`` is replaced only with ``force`` and only if it
    is a report this function wrote, or empty; ``out`` may not be, hold or lie inside an input
    (``inputs``: adapter paths or sources). Returns the summary, with the paths written."""
    import pyarrow.parquet as pq

    check_output_not_input(out, inputs, where="--out")
    staging = peft_io.reserve_output(out, force=force, owned=_owned)
    try:
        summary = summarize(analysis)
        summary["outputs"] = {"table": str(Path(out) / TABLE_NAME), "summary": str(Path(out) / SUMMARY_NAME),
                              "plots": [str(Path(out) / name) for name in PLOTS]}
        pq.write_table(table(analysis), staging / TABLE_NAME)
        (staging / SUMMARY_NAME).write_text(markdown(analysis, summary))
        write_plots(analysis, staging)
        (staging / JSON_NAME).write_text(json.dumps(json_safe(summary), indent=1, allow_nan=False,
                                                    default=_json_default) + "\n")
        peft_io.publish_dir(staging, Path(os.path.abspath(out)))
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise
    return json_safe(summary)


def json_safe(value: object) -> object:
    """``value`` with every NaN or infinite float (a zero task's SAR) replaced by None: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _json_default(value: object) -> object:
    raise TypeError(f"not JSON: {value!r}")


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown(analysis: Analysis, summary: Mapping[str, object]) -> str:
    """summary.md: what the figures say, in tables."""
    lines = [
        "# Core-space analysis", "",
        f"{len(analysis.tasks)} adapters, {summary['modules']} modules, analysed "
        + ("" if analysis.seconds is None else f"in {analysis.seconds:.1f} s ")
        + f"by coremerge {summary['coremerge_version']}. Every figure comes from the core matrices (PAPER.md); "
        f"`{TABLE_NAME}` has one row per module, merge and task.", "",
        *[f"- Note: {note}" for note in analysis.notes], *([""] if analysis.notes else []),
        "| adapter | type | modules | ranks | dtype | path |", "|---|---|---|---|---|---|",
        *(f"| {a['name']} | {a['peft_type']} | {a['modules']} | {', '.join(map(str, a['ranks']))} | {a['dtype']} | "
          f"`{a['path']}` |" for a in analysis.adapters),
        "", "## Subspace alignment", "",
        f"SAR = the share of a task's update (Frobenius norm) in the span of the merge's top k_M left singular "
        f"directions, k_M = the fewest directions holding {analysis.sar_energy:g} of the merge's energy "
        f"(Iso-C, Marczak et al. 2025; `--sar-energy`). 1 = the merge keeps all of the task's directions. "
        + ("Full space: the same method merged on the dense updates (`--space full`)." if analysis.full
           else "Run with `--full` to compare with the same merges done in full space."), "",
        "| merge | α | mean SAR (core) | mean SAR (full) | " + " | ".join(analysis.tasks) + " |",
        "|---|---|---|---|" + "---|" * len(analysis.tasks),
    ]
    for entry in summary["methods"]:
        by_task = entry["sar_by_task"]["core"]
        lines.append(f"| {entry['merge']} | {entry['alpha']:g} | {_fmt(entry['mean_sar']['core'])} | "
                     f"{_fmt(entry['mean_sar']['full'])} | " + " | ".join(_fmt(by_task[t]) for t in analysis.tasks)
                     + " |")
    lines += ["", "Least aligned modules (mean SAR over tasks, core space):", ""]
    for entry in summary["methods"]:
        shown = ", ".join(f"`{low['module']}` {_fmt(low['mean_sar'])}" for low in entry["lowest_alignment"][:3])
        lines.append(f"- {entry['merge']}: {shown}")
    inter = summary["interference"]
    lines += ["", "## Interference between tasks", "",
              f"Mean |cosine| of two tasks' updates over all modules and pairs: {_fmt(inter['mean_abs_cosine'])}; "
              f"mean overlap of their column spaces (mean squared cosine of principal angles): "
              f"{_fmt(inter['mean_subspace_overlap'])}.", "",
              "| module | tasks | cosine | subspace overlap |", "|---|---|---|---|",
              *(f"| `{s['module']}` | {' / '.join(s['tasks'])} | {_fmt(s['cosine'])} | {_fmt(s['subspace_overlap'])} |"
                for s in inter["strongest"]),
              "", "## Information density and truncation", "",
              "k = the sum of the adapters' ranks (core space's size). The rank that keeps a share of the merge's "
              "energy in every module is what `coremerge merge --rank` needs to lose at most that share anywhere; "
              "`truncation.png` shows the relative error at every rank.", "",
              "| merge | largest k | --rank for 90% | 95% | 99% | mean over modules: 90% | 95% | 99% |",
              "|---|---|---|---|---|---|---|---|"]
    k_max = max((row["k"] for row in analysis.rows), default=0)
    for entry in summary["methods"]:
        need, mean = entry["rank_for_energy"], entry["mean_rank_for_energy"]
        lines.append(f"| {entry['merge']} | {k_max} | {need['90']} | {need['95']} | {need['99']} | "
                     f"{_fmt(mean['90'], 1)} | {_fmt(mean['95'], 1)} | {_fmt(mean['99'], 1)} |")
    lines += ["", "Plots: " + ", ".join(f"[{name}]({name})" for name in PLOTS), ""]
    return "\n".join(lines)


def write_plots(analysis: Analysis, directory: Path) -> None:
    """alignment.png (layer x module heat map of mean SAR per merge), spectra.png, truncation.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [merge.label for merge in analysis.merges]
    kinds = sorted({row["kind"] for row in analysis.rows})
    layers = sorted({row["layer"] for row in analysis.rows}, key=lambda x: (x is None, x if x is not None else 0))
    fig, axes = plt.subplots(len(labels), 1, figsize=(max(6.0, 0.3 * len(layers) + 3), 1.2 + 0.4 * len(kinds) * len(labels)),
                             squeeze=False)
    cells: dict[tuple, list[float]] = {}
    for r in analysis.rows:
        cells.setdefault((r["merge"], r["kind"], r["layer"]), []).append(r["sar"])
    for ax, label in zip(axes[:, 0], labels):
        grid = torch.full((len(kinds), len(layers)), math.nan, dtype=torch.float64)
        for i, kind in enumerate(kinds):
            for j, layer in enumerate(layers):
                value = _mean(cells.get((label, kind, layer), []))
                if value is not None:
                    grid[i, j] = value
        image = ax.imshow(grid.numpy(), aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_yticks(range(len(kinds)), kinds, fontsize=7)
        ax.set_xticks(range(len(layers)), ["–" if x is None else str(x) for x in layers], fontsize=6)
        ax.set_title(f"{label}: mean SAR over tasks (core space)", fontsize=9)
        fig.colorbar(image, ax=ax)
    axes[-1, 0].set_xlabel("layer")
    fig.tight_layout()
    fig.savefig(directory / PLOTS[0], dpi=90)
    plt.close(fig)

    k_max = max((row["k"] for row in analysis.rows), default=1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for task in analysis.tasks:
        curves = [r["task_sv"] for r in analysis.rows if r["task"] == task and r["merge"] == labels[0]]
        left.plot(range(1, k_max + 1), _mean_curve([_normalized(c) for c in curves], k_max), label=task)
    left.set(title="task spectra (σ_i / σ_1, mean over modules)", xlabel="component i", ylabel="σ_i / σ_1")
    for label in labels:
        curves = _module_curves(analysis, label, "merged_sv")
        right.plot(range(1, k_max + 1), _mean_curve([_cumulative(c) for c in curves], k_max, pad_last=True),
                   label=label)
    for share in ENERGY_SHARES:
        right.axhline(share, color="grey", linewidth=0.5, linestyle=":")
    right.set(title="merge: share of energy in the first q components", xlabel="q", ylabel="energy share",
              ylim=(0, 1.02))
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(directory / PLOTS[1], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label in labels:
        curves = _module_curves(analysis, label, "truncation_error")
        line, = ax.plot(range(1, k_max + 1), _mean_curve(curves, k_max, pad_last=True), label=f"{label} (core)")
        if analysis.full:
            full = [truncation_errors(torch.tensor(c), k_max) for c in _module_curves(analysis, label, "full_merged_sv")]
            ax.plot(range(1, k_max + 1), _mean_curve(full, k_max, pad_last=True), linestyle="--",
                    color=line.get_color(), label=f"{label} (full)")
    ax.set(title="relative error of the merge kept at rank q (mean over modules)", xlabel="q (--rank)",
           ylabel="‖ΔW − ΔW_q‖ / ‖ΔW‖", ylim=(0, 1.02))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(directory / PLOTS[2], dpi=90)
    plt.close(fig)


def _module_curves(analysis: Analysis, label: str, key: str) -> list[list[float]]:
    seen, curves = set(), []
    for row in analysis.rows:
        if row["merge"] == label and row["module"] not in seen:
            seen.add(row["module"])
            curves.append(row[key])
    return curves


def _normalized(sv: Sequence[float]) -> list[float]:
    return [s / sv[0] for s in sv] if sv and sv[0] > 0 else []


def _cumulative(sv: Sequence[float]) -> list[float]:
    total = sum(s * s for s in sv)
    out, acc = [], 0.0
    for s in sv:
        acc += s * s
        out.append(acc / total)
    return out if total > 0 else []


def _mean_curve(curves: Sequence[Sequence[float]], length: int, *, pad_last: bool = False) -> list[float]:
    """The mean of curves of different lengths at each of ``length`` points; a short curve counts as
    its last value (``pad_last``) or as absent beyond its end."""
    means = []
    for i in range(length):
        values = [c[i] if i < len(c) else (c[-1] if pad_last and c else None) for c in curves]
        mean = _mean([v for v in values if v is not None])
        means.append(math.nan if mean is None else mean)
    return means


__all__ = ["Analysis", "MergeSpec", "analyze", "analyze_module", "alignment", "energy_rank", "is_analysis_report",
           "layer_and_kind", "merge_specs", "overlaps", "summarize", "truncation_errors", "write_report"]
