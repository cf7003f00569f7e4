"""The manifest: one Parquet row per shard of every merge, written by the driver alone.

It lives at ``output_dir/manifest/manifest.parquet`` (read it with
``pyarrow.parquet.read_table("output_dir/manifest")``) and is an index of what is on disk:
a shard is finished when its row says ``done`` and its file still has the recorded sha256
(and the bases file a sweep's shard file names, the sha256 recorded in it).
The file is replaced atomically (temp file, fsync, rename), so a reader or a crash never
sees half of it.

Columns: merge, shard, status (pending, running, done, failed, skipped), path (shard file,
relative to output_dir), sha256, bytes, attempt (times the shard was handed to a worker),
seconds (work time), error, modules, fingerprint (hash of the inputs and options that decide
the shard), worker (host:pid), device, max_rss_mb and max_gpu_mb (the worker process's peak
memory so far), started_at and finished_at (unix time), output_sha256 (of the merge's
assembled adapter_model.safetensors, once written).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.plan import Plan
from pipeline.worker import shard_intact

MANIFEST_DIR = "manifest"
MANIFEST_FILE = "manifest.parquet"

SCHEMA = pa.schema([
    ("merge", pa.string()), ("shard", pa.string()), ("status", pa.string()), ("path", pa.string()),
    ("sha256", pa.string()), ("bytes", pa.int64()), ("attempt", pa.int32()), ("seconds", pa.float64()),
    ("error", pa.string()), ("modules", pa.list_(pa.string())), ("fingerprint", pa.string()),
    ("worker", pa.string()), ("device", pa.string()), ("max_rss_mb", pa.float64()),
    ("max_gpu_mb", pa.float64()), ("started_at", pa.float64()), ("finished_at", pa.float64()),
    ("output_sha256", pa.string()),
])

Key = tuple[str, str]  # (merge, shard)

# Files checked at once when a run resumes: reading and hashing release the GIL, so a big job's
# gigabytes of shard files are verified at the speed of the disk rather than of one core (2.9 GB,
# read cold on this project's 2-core VM: 2.5 s on one thread, 1.5 s on four).
CHECK_THREADS = 8

SAVE_COST_FACTOR = 20  # throttled saves wait at least this many times the last save's duration

T = TypeVar("T")
R = TypeVar("R")


def in_threads(fn: Callable[[T], R], items: Sequence[T], threads: int | None = None) -> list[R]:
    """``[fn(item) for item in items]``, computed on up to ``threads`` threads (default
    :data:`CHECK_THREADS`; for reading and hashing files)."""
    threads = CHECK_THREADS if threads is None else threads
    if threads <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        return list(pool.map(fn, items))


def manifest_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / MANIFEST_DIR / MANIFEST_FILE


class JobBusyError(RuntimeError):
    """Another driver holds the job's lock (it is running the same output_dir)."""


@contextlib.contextmanager
def job_lock(output_dir: str | Path) -> Iterator[None]:
    """Hold ``output_dir/manifest/.lock`` while the job runs: one driver per output directory.

    An flock: the kernel releases it when the driver dies, even by SIGKILL.
    """
    path = Path(output_dir) / MANIFEST_DIR / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JobBusyError(f"another driver is running a job in {output_dir} (it holds {path}); "
                               f"wait for it, or check with: python -m pipeline status") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_manifest(output_dir: str | Path) -> pa.Table | None:
    """The manifest table of a job's output directory, or None if the job never started."""
    path = manifest_path(output_dir)
    if not path.exists():
        return None
    return pq.read_table(path)


class Manifest:
    """The driver's in-memory manifest; :meth:`save` writes it atomically."""

    def __init__(self, output_dir: str | Path, rows: dict[Key, dict[str, object]] | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.rows: dict[Key, dict[str, object]] = rows or {}
        self._saved_at = 0.0
        self._save_seconds = 0.0  # how long the last save took
        self._dirty = False

    @classmethod
    def load(cls, output_dir: str | Path) -> "Manifest":
        table = read_manifest(output_dir)
        rows = {}
        if table is not None:
            for row in table.to_pylist():
                rows[(row["merge"], row["shard"])] = {name: row.get(name) for name in SCHEMA.names}
        return cls(output_dir, rows)

    def reconcile(self, plan: Plan) -> set[Key]:
        """Fit the rows to ``plan``; returns the shards still to do.

        A shard is kept (never redone) when its row is ``done`` for the same fingerprint and its
        file exists with the recorded sha256. Rows of shards no longer planned are dropped.
        """
        rows, todo = {}, set()
        finished = [key for key, unit in plan.units.items() if (old := self.rows.get(key)) is not None
                    and old["fingerprint"] == unit.fingerprint and old["status"] == "done"]
        checks = in_threads(self._intact, [self.rows[key] for key in finished])  # each file read and hashed
        intact = {key for key, ok in zip(finished, checks) if ok}
        for key, unit in plan.units.items():
            old = self.rows.get(key)
            same = old is not None and old["fingerprint"] == unit.fingerprint
            if key in intact:
                rows[key] = old
                continue
            rows[key] = self.blank(key, unit.path, list(unit.modules), unit.fingerprint,
                                   attempt=int(old["attempt"] or 0) if same else 0)
            todo.add(key)
        self.rows = rows
        self._dirty = True
        return todo

    def blank(self, key: Key, path: str, modules: list[str], fingerprint: str, *, attempt: int) -> dict[str, object]:
        row = dict.fromkeys(SCHEMA.names)
        row.update(merge=key[0], shard=key[1], status="pending", path=path, modules=modules,
                   fingerprint=fingerprint, attempt=attempt)
        return row

    def _intact(self, row: dict[str, object]) -> bool:
        return shard_intact(self.output_dir / str(row["path"]), row["sha256"])

    def update(self, key: Key, **values: object) -> None:
        self.rows[key].update(values)
        self._dirty = True

    def of_merge(self, merge: str) -> list[dict[str, object]]:
        return [row for (m, _), row in self.rows.items() if m == merge]

    def count(self, status: str, keys: Iterable[Key] | None = None) -> int:
        keys = self.rows if keys is None else keys
        return sum(1 for key in keys if self.rows[key]["status"] == status)

    def save(self, *, every: float = 0.0) -> None:
        """Write the table (temp file, fsync, rename).

        With ``every``: at most every ``every`` seconds, and at most every 20 times as long as the
        last save took, so that a job of hundreds of thousands of shards spends no more than 5% of
        the driver's time rewriting its manifest (each save writes every row).
        """
        now = time.monotonic()
        if not self._dirty or (every and now - self._saved_at < max(every, SAVE_COST_FACTOR * self._save_seconds)):
            return
        path = manifest_path(self.output_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(list(self.rows.values()), schema=SCHEMA)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # a dot file: datasets skip it
        try:
            pq.write_table(table, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self._saved_at, self._dirty = now, False
        self._save_seconds = time.monotonic() - now
