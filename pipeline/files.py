"""Small file chores of the job: atomic writes of its own records, and what killed writers leave.

Everything the job writes appears atomically (a temp file or directory, then a rename); a writer
killed half-way leaves its temp behind under a name that says so. :func:`clean_leftovers` removes
them at the start of the next run, which holds the job's lock, so no writer of this job is alive.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

# what the adapter writer (coremerge.peft_io.write_adapter) leaves when killed: .NAME.tmp-* (the
# new adapter, or the old one after an exchange) and .NAME.old-* (the old adapter, moved aside)
_ADAPTER_LEFTOVER = re.compile(r"\..+\.(?:tmp|old)-[^/]*")


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory, then rename it.

    A reader sees the old file or the new one, never half of one; on any error the temp file is
    removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of the job's temp files (``.<anything>.tmp``)."""
    return name.startswith(".") and name.endswith(".tmp")


def clean_leftovers(output_dir: str | Path, record_dirs: list[str | Path]) -> list[Path]:
    """Delete what killed writers left in ``output_dir`` and in ``record_dirs`` (the manifest's
    directory); returns the paths deleted. Run it only while holding the job's lock.

    In ``output_dir``: the adapter writer's ``.NAME.tmp-*`` and ``.NAME.old-*`` (merge names never
    start with '.', so these are never a merged adapter); in ``record_dirs``: ``.*.tmp`` files.
    """
    removed: list[Path] = []
    output_dir = Path(output_dir)
    for entry in _entries(output_dir):
        if _ADAPTER_LEFTOVER.fullmatch(entry.name) and not entry.is_symlink():
            _remove(entry)
            removed.append(entry)
    for directory in record_dirs:
        for entry in _entries(Path(directory)):
            if is_temp_name(entry.name) and entry.is_file():
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def _entries(directory: Path) -> list[Path]:
    try:
        return sorted(directory.iterdir())
    except OSError:
        return []


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def prune_shards(output_dir: Path, rows: Iterable[Mapping[str, object]], merges: Iterable[str]) -> list[Path]:
    """Delete what under ``output_dir/.shards`` no longer serves the job; returns what it deleted.

    That is: the shard directories of merges the job no longer has (their manifest rows were
    dropped when the job changed; their adapter directories stay), shard files that no finished
    row names (earlier versions of a redone shard), the bases files that no finished shard names
    (an earlier run's, before its adapters changed), and temp files that killed writers left. Run
    it when no task is in flight. A shard whose file cannot be read is not finished (the next run
    redoes it and writes its bases again). Merge names never start with '.', so
    ``.shards/.bases`` is no merge's directory.
    """
    from pipeline.plan import BASES_DIR, SHARD_DIR
    from pipeline.worker import bases_of

    shards = output_dir / SHARD_DIR
    if not shards.is_dir():
        return []
    keep_bases, keep_shards = set(), set()
    for row in rows:
        if row["status"] == "done" and row["path"]:
            keep_shards.add((output_dir / str(row["path"])).resolve())
            bases = bases_of(output_dir / str(row["path"]))
            if bases is not None:
                keep_bases.add(bases.resolve())
    wanted, removed = set(merges), []
    for directory in _entries(shards):
        if not directory.is_dir() or directory.is_symlink() or directory.name.startswith("."):
            continue
        if directory.name not in wanted:
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
            continue
        for path in _entries(directory):
            if path.is_file() and path.resolve() not in keep_shards:
                path.unlink(missing_ok=True)
                removed.append(path)
    for path in sorted((shards / BASES_DIR).glob("*/*")):
        if path.is_file() and path.resolve() not in keep_bases:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
