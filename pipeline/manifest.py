"""The manifest: one Parquet row per shard of every merge, written by the driver alone.

It lives at ``output_dir/manifest/manifest.parquet`` (read it with
``pyarrow.parquet.read_table("output_dir/manifest")``) and is an index of what is on disk:
a shard is finished when its row says ``done`` and its file still has the recorded sha256
(and the bases file a sweep's shard file names, the sha256 recorded in it).
The file is replaced atomically (temp file, fsync, rename), so a reader or a crash never
sees half of it. It is an index, not the only record: every shard file carries its sha256 in
its name and the fingerprint of its inputs in its header, so a manifest that is lost or damaged
(truncated, empty, another schema) is rebuilt from the shard files that prove themselves
(:meth:`Manifest.reconcile`), and so is the record of a shard whose driver was killed before it
saved.

Columns: merge, shard, status (pending, running, done, failed, skipped), path (shard file,
relative to output_dir), sha256, bytes, attempt (times the shard was handed to a worker),
seconds (work time), error, modules, fingerprint (hash of the inputs' contents and the options
that decide the shard), worker (host:pid), device, max_rss_mb and max_gpu_mb (the worker
process's peak memory so far), started_at and finished_at (unix time), output_sha256 (of the
merge's assembled adapter_model.safetensors, once written), output_digest (of all the files of
the merge's adapter directory and what they were made from: a finished adapter is trusted only
while it matches).
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
from pipeline.worker import find_shards, shard_intact

MANIFEST_DIR = "manifest"
MANIFEST_FILE = "manifest.parquet"
DAMAGED_NAME = "_manifest.parquet.damaged"  # a damaged manifest is kept beside, for a post-mortem ("_": no
# reader of output_dir/manifest as a pyarrow dataset trips on it)

SCHEMA = pa.schema([
    ("merge", pa.string()), ("shard", pa.string()), ("status", pa.string()), ("path", pa.string()),
    ("sha256", pa.string()), ("bytes", pa.int64()), ("attempt", pa.int32()), ("seconds", pa.float64()),
    ("error", pa.string()), ("modules", pa.list_(pa.string())), ("fingerprint", pa.string()),
    ("worker", pa.string()), ("device", pa.string()), ("max_rss_mb", pa.float64()),
    ("max_gpu_mb", pa.float64()), ("started_at", pa.float64()), ("finished_at", pa.float64()),
    ("output_sha256", pa.string()), ("output_digest", pa.string()),
])
REQUIRED = ("merge", "shard", "status", "path", "sha256", "fingerprint")  # without these a table is not ours
STATUSES = frozenset({"pending", "running", "done", "failed", "skipped"})

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


class ManifestDamaged(ValueError):
    """The manifest file exists but is not a manifest this project can read; one line."""


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
    """The manifest table of a job's output directory (in :data:`SCHEMA`), or None if the job never
    started. Raises :class:`ManifestDamaged` for a file that is not a readable manifest."""
    path = manifest_path(output_dir)
    if not os.path.lexists(path):
        return None
    try:
        table = pq.read_table(path)
    except (OSError, ValueError, pa.ArrowException) as err:
        raise ManifestDamaged(f"{path}: not a readable Parquet file ({_one_line(err)})") from None
    missing = [name for name in REQUIRED if name not in table.schema.names]
    if missing:
        raise ManifestDamaged(f"{path}: not a coremerge manifest (no column {', '.join(missing)})")
    columns = []
    for field in SCHEMA:  # columns of a newer or older version of the schema: cast or filled with nulls
        if field.name not in table.schema.names:
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        try:
            columns.append(table.column(field.name).cast(field.type))
        except (pa.ArrowException, ValueError) as err:
            raise ManifestDamaged(f"{path}: column {field.name} is {table.schema.field(field.name).type}, expected "
                                  f"{field.type} ({_one_line(err)})") from None
    table = pa.Table.from_arrays(columns, schema=SCHEMA)
    for name in ("merge", "shard", "status"):
        if table.column(name).null_count:
            raise ManifestDamaged(f"{path}: column {name} has empty values")
    bad = set(table.column("status").to_pylist()) - STATUSES
    if bad:
        raise ManifestDamaged(f"{path}: unknown status {sorted(bad)[0]!r}")
    return table


class Manifest:
    """The driver's in-memory manifest; :meth:`save` writes it atomically.

    ``damaged`` is the reason when :meth:`load` found a damaged manifest and started afresh.
    """

    def __init__(self, output_dir: str | Path, rows: dict[Key, dict[str, object]] | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.rows: dict[Key, dict[str, object]] = rows or {}
        self.damaged: str | None = None
        self._saved_at = 0.0
        self._save_seconds = 0.0  # how long the last save took
        self._dirty = False

    @classmethod
    def load(cls, output_dir: str | Path, *, keep_damaged: bool = True) -> "Manifest":
        """The saved manifest; a damaged one counts as lost (moved aside to ``_manifest.parquet.damaged``
        unless ``keep_damaged`` is False, when it is left alone) and the manifest starts empty:
        :meth:`reconcile` then proves finished shards from the files on disk."""
        try:
            table = read_manifest(output_dir)
        except ManifestDamaged as err:
            manifest = cls(output_dir)
            manifest.damaged = str(err)
            if keep_damaged:
                path = manifest_path(output_dir)
                with contextlib.suppress(OSError):
                    os.replace(path, path.with_name(DAMAGED_NAME))
            return manifest
        rows = {}
        if table is not None:
            for row in table.to_pylist():
                rows[(row["merge"], row["shard"])] = row
        return cls(output_dir, rows)

    def reconcile(self, plan: Plan) -> set[Key]:
        """Fit the rows to ``plan``; returns the shards still to do.

        A shard is kept (never redone) when its row is ``done`` for the same fingerprint and its
        file exists with the recorded sha256. A shard without such a row is done all the same when
        a shard file on disk proves it (its name carries its sha256 and its header the same
        fingerprint: a run killed before it saved its manifest, or a manifest lost). Rows of shards
        no longer planned are dropped.
        """
        rows, todo = {}, set()
        finished = [key for key, unit in plan.units.items() if (old := self.rows.get(key)) is not None
                    and old["fingerprint"] == unit.fingerprint and old["status"] == "done"]
        checks = in_threads(self._intact, [self.rows[key] for key in finished])  # each file read and hashed
        intact = {key for key, ok in zip(finished, checks) if ok}
        found = self._found_on_disk(plan, [key for key in plan.units if key not in intact])
        for key, unit in plan.units.items():
            old = self.rows.get(key)
            same = old is not None and old["fingerprint"] == unit.fingerprint
            if key in intact:
                rows[key] = old
                continue
            attempt = int(old["attempt"] or 0) if same else 0
            rows[key] = self.blank(key, list(unit.modules), unit.fingerprint, attempt=attempt)
            if key in found:
                path, sha, size = found[key]
                rows[key].update(status="done", path=path, sha256=sha, bytes=size, attempt=max(attempt, 1))
            else:
                todo.add(key)
        self.rows = rows
        self._dirty = True
        return todo

    def _found_on_disk(self, plan: Plan, keys: Sequence[Key]) -> dict[Key, tuple[str, str, int]]:
        """Shards of ``keys`` that a shard file on disk proves done: key -> (relative path, sha256, bytes)."""
        by_dir: dict[str, list[Key]] = {}
        for key in keys:
            by_dir.setdefault(plan.units[key].directory, []).append(key)

        def look(directory: str) -> dict[Key, tuple[str, str, int]]:
            wanted = {(plan.units[key].shard, plan.units[key].fingerprint): key for key in by_dir[directory]}
            proved = find_shards(self.output_dir / directory, wanted)
            return {key: (f"{directory}/{path.name}", sha, size) for key, (path, sha, size) in proved.items()}

        found: dict[Key, tuple[str, str, int]] = {}
        for part in in_threads(look, sorted(by_dir)):
            found.update(part)
        return found

    def blank(self, key: Key, modules: list[str], fingerprint: str, *, attempt: int) -> dict[str, object]:
        row = dict.fromkeys(SCHEMA.names)
        row.update(merge=key[0], shard=key[1], status="pending", modules=modules, fingerprint=fingerprint,
                   attempt=attempt)
        return row

    def _intact(self, row: dict[str, object]) -> bool:
        return bool(row["path"]) and shard_intact(self.output_dir / str(row["path"]), row["sha256"])

    @property
    def dirty(self) -> bool:
        """Whether rows changed since the last save that reached the disk."""
        return self._dirty

    def update(self, key: Key, **values: object) -> None:
        self.rows[key].update(values)
        self._dirty = True

    def of_merge(self, merge: str) -> list[dict[str, object]]:
        return [row for (m, _), row in self.rows.items() if m == merge]

    def count(self, status: str, keys: Iterable[Key] | None = None) -> int:
        keys = self.rows if keys is None else keys
        return sum(1 for key in keys if self.rows[key]["status"] == status)

    def save(self, *, every: float = 0.0) -> bool:
        """Write the table (temp file, fsync, rename); True if it wrote. Raises OSError (a full disk)
        with the saved manifest untouched.

        With ``every``: at most every ``every`` seconds, and at most every 20 times as long as the
        last save took, so that a job of hundreds of thousands of shards spends no more than 5% of
        the driver's time rewriting its manifest (each save writes every row).
        """
        now = time.monotonic()
        if not self._dirty or (every and now - self._saved_at < max(every, SAVE_COST_FACTOR * self._save_seconds)):
            return False
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
        return True


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:200] or type(err).__name__
