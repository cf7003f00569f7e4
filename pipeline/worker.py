"""The unit of work, without Ray: merge one shard of one adapter set for several merges.

:func:`run_shard` reads the shard's modules straight from the adapters' safetensors files,
builds each module's core space once, runs every merge on it (merges that differ only in
alpha run their method once: each method scales by alpha last), and writes one shard file
per merge (temp file, then rename). It returns small records (no tensors) for the driver.
The actor in :mod:`pipeline.actors` is a thin wrapper around it.

Shard file: safetensors with ``<module>.a`` (q, n) and ``<module>.b`` (m, q) in the merge's
output dtype (the same conversion ``coremerge merge`` applies before writing, so assembling
from shard files is lossless), and one metadata entry ``coremerge_shard`` (JSON).

Test hooks (used by tests/pipeline only; never set them in production):
``crash_once`` = a marker path: the first worker to create it exits the process
(``os._exit(1)``) in the middle of its shard; ``shard_delay`` = seconds to sleep per shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open

from coremerge.merge import MergeOptions, build_core_space, merge_module_of, parse_dtype
from coremerge.peft_io import AdapterSource, all_finite, remember_sha256, safetensors_header, tensor_bytes
from coremerge.types import LowRank, StoredLowRank

META_KEY = "coremerge_shard"


@dataclass(frozen=True)
class Target:
    """One merge that a task computes: its checked options and where its shard file goes."""

    merge: str
    options: MergeOptions  # from MergeOptions.checked (device "cpu"; the worker sets its own)
    out_dtype: str
    path: str  # absolute path of the shard file


@dataclass(frozen=True)
class ShardWork:
    """What a worker needs for one task: paths and names only."""

    shard: str
    adapters: tuple[str, ...]
    modules: tuple[str, ...]
    targets: tuple[Target, ...]


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
    merged: dict[str, dict[str, LowRank]] = {t.merge: {} for t in work.targets}
    errors: dict[str, str] = {}
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
                result = merge_module_of(sources, module, options, core_space=space, cores=cores)
                result = result.to(dtype=parse_dtype(target.out_dtype), device="cpu")
                _check_finite(result, module)
                merged[target.merge][module] = result
            except Exception as err:  # noqa: BLE001
                errors[target.merge] = _message(module, err)
            spent[target.merge] += shared + time.perf_counter() - t1
        if index == 0:
            _test_hooks(hooks)
    def write(target: Target) -> dict[str, object]:
        return _write_target(target, work, merged, errors, spent)

    if len(work.targets) == 1:
        records = [write(work.targets[0])]
    else:  # two at a time: hashing one overlaps the kernel taking another's bytes (both release the GIL)
        with ThreadPoolExecutor(max_workers=2) as pool:
            records = list(pool.map(write, work.targets))
    usage = _usage(device)
    for record in records:
        record.update(usage, task_seconds=round(time.perf_counter() - started, 6))
    return records


def _write_target(target: Target, work: ShardWork, merged: Mapping[str, Mapping[str, LowRank]],
                  errors: Mapping[str, str], spent: Mapping[str, float]) -> dict[str, object]:
    """Write ``target``'s shard file (unless its merge failed); its record."""
    started = time.perf_counter()
    record: dict[str, object] = {"merge": target.merge, "shard": work.shard, "status": "failed",
                                 "error": errors.get(target.merge), "sha256": None, "bytes": None}
    if target.merge not in errors:
        try:
            sha, size = write_shard(target.path, merged[target.merge], meta={"merge": target.merge, "shard": work.shard})
            record.update(status="done", sha256=sha, bytes=size, ranks=[merged[target.merge][m].rank for m in work.modules])
        except OSError as err:
            record["error"] = f"cannot write shard file {target.path}: {err.strerror or err}"
    record["seconds"] = round(spent[target.merge] + time.perf_counter() - started, 6)
    return record


def failed_records(work: ShardWork, error: str) -> list[dict[str, object]]:
    """Records that fail every target of ``work`` with ``error`` (e.g. its adapters cannot be opened)."""
    return [{"merge": t.merge, "shard": work.shard, "status": "failed", "error": error, "sha256": None,
             "bytes": None, "seconds": 0.0} for t in work.targets]


def write_shard(path: str | Path, merged: Mapping[str, LowRank], *, meta: Mapping[str, object]) -> tuple[str, int]:
    """Write a shard file atomically (temp file, then rename); returns (sha256, size).

    The bytes are hashed as they are written (no second read, no copy of the tensors). The file is not
    fsynced: a shard is a checkpoint that every reader checks against this sha256 first (resume,
    assembly), so one that a power cut left short or empty is found and merged again, and a
    sweep does not wait on the disk for each of its hundreds of files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, lowrank in merged.items():
        tensors[f"{module}.a"] = lowrank.a.contiguous()  # (q, n)
        tensors[f"{module}.b"] = lowrank.b.contiguous()  # (m, q)
    dtypes = {t.dtype for t in tensors.values()}
    assert len(dtypes) == 1, f"a shard holds one dtype, got {dtypes}"
    energy = {module: lowrank.energy_kept for module, lowrank in merged.items()}
    header = json.dumps({**meta, "modules": list(merged), "energy_kept": energy}, sort_keys=True)
    # The bytes safetensors' save_file writes (tested), streamed from the tensors' own memory.
    chunks = [safetensors_header({k: tuple(t.shape) for k, t in tensors.items()}, dtypes.pop(), {META_KEY: header})]
    chunks += [tensor_bytes(tensors[name]) for name in sorted(tensors)]
    digest, size = hashlib.sha256(), 0
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                digest.update(chunk)
                size += memoryview(chunk).nbytes
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    sha = digest.hexdigest()
    remember_sha256(path, sha)
    return sha, size


def read_shard(path: str | Path) -> dict[str, LowRank]:
    """The merged modules in a shard file, in the order they were written."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})[META_KEY])
        return {module: LowRank(a=f.get_tensor(f"{module}.a"), b=f.get_tensor(f"{module}.b"),
                                energy_kept=meta["energy_kept"][module])
                for module in meta["modules"]}


def stored_modules(path: str | Path) -> dict[str, StoredLowRank]:
    """The merged modules in a shard file, in the order they were written, each loaded only on demand.

    Shapes and energies come from the file's header; :meth:`StoredLowRank.load` reads one module's
    two tensors. Assembly hands these to the adapter writer, so the driver holds one module at a time.
    """
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})[META_KEY])
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}

    def loader(module: str) -> Callable[[], LowRank]:
        def load() -> LowRank:
            with safe_open(str(path), framework="pt") as f:
                return LowRank(a=f.get_tensor(f"{module}.a"), b=f.get_tensor(f"{module}.b"),
                               energy_kept=meta["energy_kept"][module])
        return load

    out = {}
    for module in meta["modules"]:
        (q, n), (m, _) = shapes[f"{module}.a"], shapes[f"{module}.b"]
        out[module] = StoredLowRank(rank=q, in_features=n, out_features=m, energy_kept=meta["energy_kept"][module],
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
