"""The unit of work, without Ray: merge one shard of one adapter set for several merges.

:func:`run_shard` reads the shard's modules straight from the adapters' safetensors files,
builds each module's core space once, runs every merge on it (merges that differ only in
alpha run their method once: each method scales by alpha last), and writes one shard file
per merge (temp file, then rename). It returns small records (no tensors) for the driver.
The actor in :mod:`pipeline.actors` is a thin wrapper around it.

Shard file: safetensors with one metadata entry ``coremerge_shard`` (JSON) and, per module,
either its LoRA factors ``<module>.a`` (q, n) and ``<module>.b`` (m, q) in the merge's output
dtype (the conversion ``coremerge merge`` applies before writing, so assembling from shard
files is lossless), or, for the core-space merges of a sweep, only the merge's small factors
``<module>.x`` (ku, q) and ``<module>.y`` (q, kv, when a rank was asked for) in the compute
dtype. Those refer (by a path relative to the shard file, and its sha256) to one *bases file*
per task, ``<module>.u`` (m, ku) and ``<module>.v`` (kv, n), that every merge of the sweep
shares: assembly multiplies them out with :meth:`FactoredLowRank.expand`, the same call that
``coremerge merge`` makes, so the bytes are the same. A 16-merge sweep so writes its bases
once instead of 16 times (1B adapters: 0.2 GB of shard files instead of 1.4 GB).
:func:`storage_plan` picks the form that writes fewer bytes.

Test hooks (used by tests/pipeline only; never set them in production):
``crash_once`` = a marker path: the first worker to create it exits the process
(``os._exit(1)``) in the middle of its shard; ``shard_delay`` = seconds to sleep per shard.
"""

from __future__ import annotations

import json
import os
import re
import resource
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import torch

from coremerge.analyze import MergeSpec as AnalysisMerge
from coremerge.analyze import analyze_module, json_safe, task_names
from coremerge.merge import MergeOptions, build_core_space, merge_module_of, parse_dtype, present_in
from coremerge.errors import AdapterError
from coremerge.peft_io import (AdapterSource, all_finite, known_sha256, read_tensors, remember_sha256,
                               safetensors_header, safetensors_index, tensor_bytes, weights_sha256, write_hashed)
from coremerge.safetensors_file import FileVersion, known_entry
from coremerge.types import FactoredLowRank, LowRank, StoredLowRank

META_KEY = "coremerge_shard"
K = TypeVar("K")


@dataclass(frozen=True)
class Target:
    """One merge that a task computes: its checked options and where its shard file goes."""

    merge: str
    options: MergeOptions  # from MergeOptions.checked (device "cpu"; the worker sets its own)
    out_dtype: str
    directory: str  # absolute directory of the merge's shard files
    fingerprint: str  # of the shard's inputs and options, written into the shard file's header
    analyze: float | None = None  # core-space merges of a job with `analyze`: the SAR energy share


@dataclass(frozen=True)
class InputVersion:
    """One input adapter as the driver planned it: a worker merges exactly these contents or nothing."""

    adapter: str  # as the job names it
    config_sha256: str  # of adapter_config.json
    weights_sha256: str  # of the weights file
    version: FileVersion  # of the weights file, as the driver saw it (equal here: no need to hash it again)


def input_versions(sources: Sequence[AdapterSource]) -> tuple[InputVersion, ...]:
    """What the driver plans from: each adapter's config and weights hashes (the weights hashed as of the
    version that was opened; AdapterError if the file has changed since)."""
    return tuple(InputVersion(adapter=src.name, config_sha256=src.config_sha256, weights_sha256=weights_sha256(src),
                              version=src.weights_version) for src in sources)


def changed_input(sources: Sequence[AdapterSource], expected: Sequence[InputVersion]) -> str | None:
    """Why ``sources`` (as a worker opened them) are not the inputs the driver planned from, or None.

    A weights file of the same version is taken as the same content (the driver hashed that version);
    any other version (another inode, size, mtime or ctime; or another host's view of it) is hashed
    and compared, so an input replaced during a run fails the merges that read it instead of giving
    an adapter made from two versions.
    """
    for src, want in zip(sources, expected, strict=True):
        if src.config_sha256 != want.config_sha256:
            return (f"adapter {src.name!r}: adapter_config.json changed since the job started; nothing built from it "
                    f"is kept; run the job again to merge the new version")
        if src.weights_version == want.version:
            continue
        try:
            sha = weights_sha256(src)
        except AdapterError as err:
            return str(err)
        if sha != want.weights_sha256:
            return (f"adapter {src.name!r}: {src.weights_file.name} changed since the job started (sha256 "
                    f"{want.weights_sha256[:12]}... -> {sha[:12]}...); nothing built from it is kept; run the job "
                    f"again to merge the new version")
    return None


@dataclass(frozen=True)
class ShardWork:
    """What a worker needs for one task: paths, names and the expected input contents."""

    shard: str
    adapters: tuple[str, ...]
    modules: tuple[str, ...]
    targets: tuple[Target, ...]
    bases_dir: str  # absolute directory for this adapter set's bases files (see the module doc)
    inputs: tuple[InputVersion, ...] = ()  # one per adapter: what the driver planned from (empty: not checked)


def storage_plan(work: ShardWork, sources: Sequence[AdapterSource]) -> frozenset[str]:
    """The merges of ``work`` whose shard files hold small factors beside one shared bases file.

    Its core-space merges, when the bases once plus each merge's small factors take fewer bytes
    than each merge's LoRA factors (from the adapters' shapes: ranks sum to k per module);
    otherwise none. With float32 compute that is from 3 merges up for bfloat16 output, from 2 for
    float32 output; a single merge keeps the plain form.

    Example:
        >>> storage_plan(sweep_of_16, sources)  # doctest: +SKIP
        frozenset({'s-ta-a0.5', ...})
    """
    return shard_bytes(work, sources)[0]


def shard_bytes(work: ShardWork, sources: Sequence[AdapterSource]) -> tuple[frozenset[str], int, dict[str, int]]:
    """(:func:`storage_plan`, bytes of the shared bases file, {merge: bytes of its shard file}) for
    ``work``, from the adapters' shapes (an upper bound: ranks sum to k per module; headers left out).
    A merge's adapter takes its plain size: ``{merge: bytes}[merge]`` when it is not factored."""
    plain = {t.merge: 0 for t in work.targets}
    small = dict(plain)
    shared = 0
    core = [t for t in work.targets if t.options.space == "core"]
    compute = torch.empty((), dtype=work.targets[0].options.compute_dtype).element_size()
    for module in work.modules:
        specs = [src.modules[module] for src in sources if module in src.modules]
        m, n, k = specs[0].out_features, specs[0].in_features, sum(spec.rank for spec in specs)
        ku, kv = min(m, k), min(n, k)  # the bases' widths at most
        shared += (m * ku + kv * n) * compute
        for target in work.targets:
            rank = target.options.rank
            q = kv if rank is None else min(rank, ku, kv)
            plain[target.merge] += (m + n) * q * parse_dtype(target.out_dtype).itemsize
            small[target.merge] += (ku * q + (0 if rank is None else q * kv)) * compute
    factored = bool(core) and shared + sum(small[t.merge] for t in core) < sum(plain[t.merge] for t in core)
    if not factored:
        return frozenset(), 0, plain
    names = frozenset(t.merge for t in core)
    return names, shared, {merge: small[merge] if merge in names else size for merge, size in plain.items()}


def run_shard(work: ShardWork, sources: Sequence[AdapterSource], *, device: str = "cpu",
              hooks: Mapping[str, str] | None = None) -> list[dict[str, object]]:
    """Merge ``work.modules`` for every target; write each target's shard file; one record each.

    A failure (unreadable tensor, NaN, a method error) fails only the targets it touches:
    their records have ``status="failed"`` and a one-line ``error``; nothing is raised.

    Example:
        >>> records = run_shard(work, open_all(work.adapters))  # doctest: +SKIP
        >>> records[0]["status"], records[0]["sha256"][:8]  # doctest: +SKIP
        ('done', '3f2a9c1e')
    """
    hooks = hooks or {}
    started = time.perf_counter()
    merged: dict[str, dict[str, LowRank | FactoredLowRank]] = {t.merge: {} for t in work.targets}
    factored = storage_plan(work, sources)
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # module -> (u, v) on the CPU, for the bases file
    errors: dict[str, str] = {}
    analysis: dict[str, list[dict[str, object]]] = {t.merge: [] for t in work.targets if t.analyze is not None}
    spent = dict.fromkeys(merged, 0.0)  # seconds per target, shared work split evenly
    compute = {t.options.compute_dtype for t in work.targets}
    assert len(compute) == 1, "a task's merges share one adapter set and compute dtype"
    compute_dtype = compute.pop()
    for index, module in enumerate(work.modules):
        live = [t for t in work.targets if t.merge not in errors]
        if not live:
            break
        t0 = time.perf_counter()
        try:
            core_space = None
            if any(t.options.space == "core" for t in live):  # built once, reused by every merge
                core_space = build_core_space(sources, module, compute_dtype=compute_dtype, device=device)
        except Exception as err:  # noqa: BLE001  (a bad adapter fails this task's merges, not the job)
            errors.update((t.merge, _message(module, err)) for t in live)
            continue
        shared = (time.perf_counter() - t0) / len(live)
        cores: dict[tuple, torch.Tensor | None] = {}  # merged cores at alpha 1, shared across alphas
        for target in live:
            t1 = time.perf_counter()
            try:
                options = replace(target.options, device=device)
                space = core_space if options.space == "core" else None
                result = merge_module_of(sources, module, options, core_space=space, cores=cores,
                                         factored=target.merge in factored)
                if isinstance(result, FactoredLowRank):
                    result = _small_factors_on_cpu(result, module, bases)
                else:  # a factored merge's plain modules (all-zero ones) stay in its file's one dtype
                    dtype = options.compute_dtype if target.merge in factored else parse_dtype(target.out_dtype)
                    result = result.to(dtype=dtype, device="cpu")
                    _check_finite(result, module)
                merged[target.merge][module] = result
            except Exception as err:  # noqa: BLE001
                errors[target.merge] = _message(module, err)
            if target.merge in analysis and target.merge not in errors:
                try:  # from the cores just built and merged: no second merge
                    analysis[target.merge] += _analyze_module(sources, module, options, target, core_space, cores)
                except Exception as err:  # noqa: BLE001  (the job asked for it: the shard fails, and is retried)
                    errors[target.merge] = f"analysis: {_message(module, err)}"
            spent[target.merge] += shared + time.perf_counter() - t1
        if index == 0:
            _test_hooks(hooks)
    bases_file: tuple[Path, str] | None = None
    if bases and any(t.merge in factored and t.merge not in errors for t in work.targets):
        try:
            bases_file = write_bases(Path(work.bases_dir), work.shard, bases)
        except OSError as err:
            message = f"cannot write the bases file in {work.bases_dir}: {err.strerror or err}"
            errors.update((t.merge, message) for t in work.targets if t.merge in factored and t.merge not in errors)

    def write(target: Target) -> dict[str, object]:
        extra = {"analysis": json_safe(analysis[target.merge])} if target.merge in analysis else {}
        return _write_target(target, work, merged, errors, spent, bases_file if target.merge in factored else None,
                             extra)

    if len(work.targets) == 1:
        records = [write(work.targets[0])]
    else:  # two at a time: hashing one overlaps the kernel taking another's bytes (both release the GIL)
        with ThreadPoolExecutor(max_workers=2) as pool:
            records = list(pool.map(write, work.targets))
    usage = _usage(device)
    for record in records:
        record.update(usage, task_seconds=round(time.perf_counter() - started, 6))
    return records


def _small_factors_on_cpu(result: FactoredLowRank, module: str,
                         bases: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> FactoredLowRank:
    """``result`` on the CPU, its u and v the task's shared copies (moved and checked once per module)."""
    if module not in bases:
        u, v = result.u.to("cpu"), result.v.to("cpu")
        if not (all_finite(u) and all_finite(v)):
            raise ValueError(f"the reference bases have NaN or Inf values (check the adapters' tensors of {module})")
        bases[module] = (u, v)
    u, v = bases[module]
    small = FactoredLowRank(u=u, x=result.x.to("cpu"), y=None if result.y is None else result.y.to("cpu"), v=v,
                            energy_kept=result.energy_kept)
    if not (all_finite(small.x) and (small.y is None or all_finite(small.y))):
        raise ValueError(f"the merge produced NaN or Inf values (check the adapters' tensors of {module})")
    return small


def _analyze_module(sources: Sequence[AdapterSource], module: str, options: MergeOptions, target: Target,
                    core_space: object, cores: dict[tuple, torch.Tensor | None]) -> list[dict[str, object]]:
    """``coremerge analyze``'s rows of one module of a core-space merge, from the shard's core space and the
    merged core cached in ``cores``."""
    present = present_in(sources, module)
    names = task_names(sources)
    spec = AnalysisMerge(label=target.merge, options=options)
    return analyze_module(module, core_space, [names[i] for i in present], [spec],
                          {target.merge: [options.weights[i] for i in present]}, sar_energy=target.analyze,
                          cores=cores)


def _write_target(target: Target, work: ShardWork, merged: Mapping[str, Mapping[str, LowRank | FactoredLowRank]],
                  errors: Mapping[str, str], spent: Mapping[str, float],
                  bases_file: tuple[Path, str] | None, extra: Mapping[str, object] | None = None) -> dict[str, object]:
    """Write ``target``'s shard file (unless its merge failed); its record. ``extra`` goes into the
    shard file's header (the analysis rows of ``analyze: true``)."""
    started = time.perf_counter()
    record: dict[str, object] = {"merge": target.merge, "shard": work.shard, "status": "failed",
                                 "error": errors.get(target.merge), "sha256": None, "bytes": None}
    if target.merge not in errors:
        meta = {"merge": target.merge, "shard": work.shard, "fingerprint": target.fingerprint, **(extra or {})}
        try:
            path, sha, size = write_shard(target.directory, work.shard, merged[target.merge], meta=meta,
                                          bases_file=bases_file)
            record.update(status="done", file=path.name, sha256=sha, bytes=size,
                          ranks=[merged[target.merge][m].rank for m in work.modules],
                          hashed=hashed([path] + ([bases_file[0]] if bases_file else [])))
        except OSError as err:
            record["error"] = f"cannot write a shard file in {target.directory}: {err.strerror or err}"
    record["seconds"] = round(spent[target.merge] + time.perf_counter() - started, 6)
    return record


def hashed(paths: Sequence[str | Path]) -> dict[str, list]:
    """{resolved path: [*FileVersion, sha256]} of files this process wrote (and so hashed as it wrote
    them), for the driver's hash cache: a rerun then checks them without reading them."""
    entries = {os.path.realpath(path): known_entry(path) for path in paths}
    return {path: [*entry[0], entry[1]] for path, entry in entries.items() if entry is not None}


def failed_records(work: ShardWork, error: str) -> list[dict[str, object]]:
    """Records that fail every target of ``work`` with ``error`` (e.g. its adapters cannot be opened)."""
    return [{"merge": t.merge, "shard": work.shard, "status": "failed", "error": error, "sha256": None,
             "bytes": None, "seconds": 0.0} for t in work.targets]


def write_shard(directory: str | Path, shard: str, merged: Mapping[str, LowRank | FactoredLowRank], *,
                meta: Mapping[str, object], bases_file: tuple[Path, str] | None = None) -> tuple[Path, str, int]:
    """Write a shard file atomically (temp file, then rename); returns (path, sha256, size).

    Its name carries its hash, ``<shard>-<sha256[:16]>.safetensors``, and ``meta`` (the merge, the
    shard and the fingerprint of what decided it) goes into its header: a shard file proves itself
    without the manifest (:func:`find_shards`). The same result gives the same file, whoever writes
    it again (a retried or resumed shard).

    A :class:`FactoredLowRank` module is stored as its small factors; its u and v must be in
    ``bases_file`` = (path, sha256) from :func:`write_bases`, which the shard file then names.
    The bytes are hashed as they are written (no second read, no copy of the tensors). The file is not
    fsynced: a shard is a checkpoint that every reader checks against this sha256 first (resume,
    assembly), so one that a power cut left short or empty is found and merged again, and a
    sweep does not wait on the disk for each of its hundreds of files.
    """
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    small = []
    for module, result in merged.items():
        if isinstance(result, FactoredLowRank):
            small.append(module)
            tensors[f"{module}.x"] = result.x.contiguous()  # (ku, q)
            if result.y is not None:
                tensors[f"{module}.y"] = result.y.contiguous()  # (q, kv)
        else:
            tensors[f"{module}.a"] = result.a.contiguous()  # (q, n)
            tensors[f"{module}.b"] = result.b.contiguous()  # (m, q)
    info: dict[str, object] = {**meta, "modules": list(merged),
                               "energy_kept": {module: result.energy_kept for module, result in merged.items()}}
    if small:
        assert bases_file is not None, "factored modules need the bases file they refer to"
        info.update(factored=small, bases=os.path.relpath(bases_file[0], directory), bases_sha256=bases_file[1])
    return _write_safetensors(directory, tensors, {META_KEY: json.dumps(info, sort_keys=True)},
                              lambda sha: shard_file_name(shard, sha))


def shard_file_name(shard: str, sha256: str) -> str:
    """The name of a shard file: its shard id and the first 16 hex digits of its sha256."""
    return f"{shard}-{sha256[:16]}.safetensors"


_SHARD_FILE = re.compile(r"(?P<shard>.+)-(?P<sha>[0-9a-f]{16})\.safetensors")


def find_shards(directory: str | Path, wanted: Mapping[tuple[str, str], K]) -> dict[K, tuple[Path, str, int]]:
    """Shard files in ``directory`` that prove themselves: ``wanted`` maps (shard id, fingerprint) to a
    key; returns key -> (path, sha256, size) for each one found whose name matches its sha256, whose
    header carries that fingerprint, and whose bases file (if any) is intact."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return {}
    found: dict[K, tuple[Path, str, int]] = {}
    shards = {shard for shard, _ in wanted}
    for name in names:
        match = _SHARD_FILE.fullmatch(name)
        if match is None or match["shard"] not in shards:
            continue
        path = Path(directory) / name
        try:  # the hash first: only a file that is what it was written as has its header parsed
            sha = known_sha256(path)
            if sha[:16] != match["sha"]:
                continue
            key = wanted.get((match["shard"], _shard_info(path).get("fingerprint")))
            if key is not None and key not in found and shard_intact(path, sha):
                found[key] = (path, sha, path.stat().st_size)
        except _NOT_A_SHARD:
            continue
    return found


def write_bases(directory: Path, shard: str, bases: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[Path, str]:
    """Write one task's bases file, ``<module>.u`` and ``<module>.v`` for each module; (path, sha256).

    Its name carries its hash (``<shard>-<sha256[:16]>.safetensors``): the same bases give the
    same file, whoever writes it again (a retried or resumed task), and different ones never
    replace a file that finished shard files still refer to.
    """
    tensors = {}
    for module, (u, v) in bases.items():
        tensors[f"{module}.u"], tensors[f"{module}.v"] = u.contiguous(), v.contiguous()
    meta = {META_KEY: json.dumps({"shard": shard, "modules": list(bases)})}
    path, sha, _ = _write_safetensors(directory, tensors, meta, lambda sha: f"{shard}-{sha[:16]}.safetensors")
    return path, sha


def _write_safetensors(directory: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                       name: Callable[[str], str]) -> tuple[Path, str, int]:
    """Write a single-dtype safetensors file into ``directory`` through a temp file renamed to
    ``name(sha256)``; (path, sha256, size)."""
    directory.mkdir(parents=True, exist_ok=True)
    dtypes = {t.dtype for t in tensors.values()}
    assert len(dtypes) == 1, f"a shard holds one dtype, got {dtypes}"
    # The bytes safetensors' save_file writes (tested), streamed from the tensors' own memory.
    chunks = [safetensors_header({k: tuple(t.shape) for k, t in tensors.items()}, dtypes.pop(), metadata)]
    chunks += [tensor_bytes(tensors[key]) for key in sorted(tensors)]
    tmp = directory / f".{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(tmp, "wb") as f:
            sha, size = write_hashed(f, chunks)
        path = directory / name(sha)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    remember_sha256(path, sha)
    return path, sha, size


_NOT_A_SHARD = (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError)  # missing, or not a shard file at all


def shard_intact(path: str | Path, sha256: str | None) -> bool:
    """Whether the shard file at ``path`` exists with ``sha256``, and the bases file it names (if
    any) with the sha256 it records: what resume and assembly check before they trust a shard."""
    path = Path(path)
    try:
        if sha256 is None or known_sha256(path) != sha256:
            return False
        info = _shard_info(path)
        bases = _bases_path(path, info)
        return bases is None or known_sha256(bases) == info["bases_sha256"]
    except _NOT_A_SHARD:
        return False


def bases_of(path: str | Path) -> Path | None:
    """The bases file a shard file names; None if it names none or cannot be read."""
    path = Path(path)
    try:
        return _bases_path(path, _shard_info(path))
    except _NOT_A_SHARD:
        return None


def _shard_info(path: Path) -> dict:
    return json.loads(safetensors_index(path)[1][META_KEY])


def _bases_path(path: Path, info: Mapping[str, object]) -> Path | None:
    """The bases file named in a shard file's metadata ``info`` (relative to the shard file), if any."""
    return path.parent / str(info["bases"]) if "bases" in info else None


def read_shard(path: str | Path) -> dict[str, LowRank]:
    """The merged modules in a shard file, in the order they were written (factored ones expanded)."""
    return {module: stored.load() for module, stored in stored_modules(path).items()}


def stored_modules(path: str | Path, *, device: str = "cpu") -> dict[str, StoredLowRank]:
    """The merged modules in a shard file, in the order they were written, each loaded only on demand.

    Shapes and energies come from the file's header (and its bases file's); :meth:`StoredLowRank.load`
    reads one module's tensors, and multiplies a factored module out on ``device`` (the merging
    worker's: the products ``coremerge merge`` makes there). Assembly hands these to the adapter
    writer, so the process that assembles holds one module at a time.
    """
    path = Path(path)
    shapes, metadata = safetensors_index(path)
    info = json.loads(metadata[META_KEY])
    bases = _bases_path(path, info)
    factored = set(info.get("factored", ()))
    if bases is not None:
        shapes.update(safetensors_index(bases)[0])

    def loader(module: str) -> Callable[[], LowRank]:
        def load() -> LowRank:
            energy = info["energy_kept"][module]
            if module not in factored:
                t = read_tensors(path, [f"{module}.a", f"{module}.b"])
                return LowRank(a=t[f"{module}.a"], b=t[f"{module}.b"], energy_kept=energy)
            small = read_tensors(path, [key for key in (f"{module}.x", f"{module}.y") if key in shapes])
            uv = read_tensors(bases, [f"{module}.u", f"{module}.v"])
            y = small.get(f"{module}.y")
            return FactoredLowRank(u=uv[f"{module}.u"].to(device), x=small[f"{module}.x"].to(device),
                                   y=None if y is None else y.to(device), v=uv[f"{module}.v"].to(device),
                                   energy_kept=energy).expand()
        return load

    out = {}
    for module in info["modules"]:
        if module in factored:
            (m, _), (_, q), (_, n) = shapes[f"{module}.u"], shapes[f"{module}.x"], shapes[f"{module}.v"]
        else:
            (q, n), (m, _) = shapes[f"{module}.a"], shapes[f"{module}.b"]
        out[module] = StoredLowRank(rank=q, in_features=n, out_features=m, energy_kept=info["energy_kept"][module],
                                    loader=loader(module))
    return out


def _check_finite(result: LowRank, module: str) -> None:
    if not (all_finite(result.a) and all_finite(result.b)):
        raise ValueError(f"the merge produced NaN or Inf values (check the adapters' tensors of {module})")


def _message(module: str, err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if not isinstance(err, (ValueError, OSError)):
        text = f"{type(err).__name__}: {text}"
    return f"module {module}: {text}"


def _usage(device: str) -> dict[str, object]:
    """Peak memory of this process so far (benchmarks read it from the manifest)."""
    usage: dict[str, object] = {
        "worker": f"{socket.gethostname()}:{os.getpid()}", "device": device,
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # KiB on Linux
        "max_gpu_mb": None,
    }
    if device.startswith("cuda"):
        usage["max_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return usage


def _test_hooks(hooks: Mapping[str, str]) -> None:
    if hooks.get("shard_delay"):
        time.sleep(float(hooks["shard_delay"]))
    marker = hooks.get("crash_once")
    if marker:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        os._exit(1)  # a hard crash in the middle of a shard, as a segfault or an OOM kill would be
