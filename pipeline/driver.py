"""The driver: validate, plan, schedule shards and assemblies on merge actors, record, resume.

``python -m pipeline run job.yaml`` calls :func:`run_job_file`. Without a cluster address
(``RAY_ADDRESS`` unset, as on a laptop) it starts a local Ray instance for the job and stops
it at the end; under ``ray job submit`` it joins the job's cluster.

Exit status: 0 every merge written; 1 some merge failed (see ``python -m pipeline status``);
2 bad job file, or another driver runs the same output_dir (nothing started); 130 interrupted.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from coremerge.peft_io import known_sha256

from pipeline.assemble import WEIGHTS_NAME, AssemblyWork, assemble
from pipeline.config import JobSpec, JobSpecError, Sources, load_job
from pipeline.manifest import JobBusyError, Key, Manifest, in_threads, job_lock, read_manifest
from pipeline.plan import BASES_DIR, SHARD_DIR, Plan, Task, make_plan, work_of
from pipeline.progress import Progress, status_table
from pipeline.worker import bases_of

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_BAD_SPEC, EXIT_INTERRUPTED = 0, 1, 2, 130


def run_job_file(path: Path) -> int:
    """Run the job in ``path`` to completion (resuming what an earlier run left); exit status."""
    try:
        job, sources = load_job(path)
    except JobSpecError as err:
        print(f"pipeline: error: {err}", file=sys.stderr)
        return EXIT_BAD_SPEC
    try:
        with job_lock(job.output_dir):
            started_ray = _connect_ray()
            try:
                return run_job(job, sources)
            finally:
                if started_ray:
                    import ray

                    ray.shutdown()
    except JobBusyError as err:
        print(f"pipeline: error: {err}", file=sys.stderr)
        return EXIT_BAD_SPEC
    except KeyboardInterrupt:
        print("pipeline: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


def status_file(path: Path) -> int:
    """``python -m pipeline status job.yaml``: per merge, shards done / total, failures, elapsed."""
    try:
        job, _ = load_job(path, open_adapters=False)
    except JobSpecError as err:
        print(f"pipeline: error: {err}", file=sys.stderr)
        return EXIT_BAD_SPEC
    table = read_manifest(job.output_dir)
    if table is None:
        print(f"no manifest at {job.output_dir / 'manifest'}: the job has not started")
        return EXIT_FAILED
    print("\n".join(status_table([m.name for m in job.merges], table.to_pylist())))
    return EXIT_OK


def _connect_ray() -> bool:
    """Join the cluster in RAY_ADDRESS, or start a local Ray; True if this call did either."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
    else:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
    return True


@dataclasses.dataclass(frozen=True)
class Resources:
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float


def resolve_resources(job: JobSpec, cluster: Mapping[str, float]) -> Resources:
    """The job's worker settings, with defaults taken from the cluster's resources.

    Example:
        >>> job = JobSpec(path=Path("j.yaml"), output_dir=Path("out"), merges=())
        >>> resolve_resources(job, {"CPU": 16.0, "GPU": 4.0})
        Resources(workers=4, cpus_per_worker=1.0, gpus_per_worker=1.0)
        >>> resolve_resources(job, {"CPU": 8.0})
        Resources(workers=4, cpus_per_worker=2.0, gpus_per_worker=0.0)
        >>> resolve_resources(dataclasses.replace(job, workers=2), {"CPU": 2.0})
        Resources(workers=2, cpus_per_worker=1.0, gpus_per_worker=0.0)
    """
    cluster_cpus, cluster_gpus = float(cluster.get("CPU", 1.0)), float(cluster.get("GPU", 0.0))
    gpus = job.gpus_per_worker if job.gpus_per_worker is not None else (1.0 if cluster_gpus >= 1 else 0.0)
    if job.cpus_per_worker is not None:
        cpus = job.cpus_per_worker
    elif gpus > 0:
        cpus = 1.0
    else:  # 2 each, fewer when the workers asked for would not fit
        share = cluster_cpus // job.workers if job.workers else cluster_cpus
        cpus = max(1.0, min(2.0, share))
    if job.workers is not None:
        workers = job.workers
    elif gpus > 0:
        workers = max(1, int(cluster_gpus // gpus))
    else:
        workers = max(1, int(cluster_cpus // cpus))
    return Resources(workers=workers, cpus_per_worker=cpus, gpus_per_worker=gpus)


def run_job(job: JobSpec, sources: Sources, *,
            progress: Progress | None = None) -> int:
    """Run a validated job on the connected Ray cluster; exit status (0 all done, 1 some failed)."""
    job.output_dir.mkdir(parents=True, exist_ok=True)
    plan = make_plan(job, sources)
    manifest = Manifest.load(job.output_dir)
    todo = manifest.reconcile(plan)
    manifest.save()
    progress = progress or Progress(total=len(plan.units), done=len(plan.units) - len(todo), merges=len(job.merges))
    run = _Run(job, sources, plan, manifest, progress)
    progress.event("start", job=str(job.path), output_dir=str(job.output_dir), merges=len(job.merges),
                   shards=len(plan.units), to_do=len(todo))
    try:
        finished = [m.name for m in job.merges if not any(key in todo for key in run.keys_of[m.name])]
        in_threads(_output_sha256, [job.output_dir / name / WEIGHTS_NAME for name in finished])  # hashed at once
        for merge in finished:  # finished in an earlier run: assemble if that did not happen
            run.assemble_if_needed(merge)
        tasks = [task for task in plan.tasks if any((m, task.shard) in todo for m in task.merges)]
        if tasks:
            run.schedule(tasks, todo)
    finally:
        manifest.save()
    removed = prune_shards(job.output_dir, manifest.rows.values(), [m.name for m in job.merges])
    if removed:
        progress.event("shards_pruned", paths=len(removed))
    failed = sorted(run.failed)
    progress.close(failed_merges=failed, worker_max_rss_mb=run.worker_max_rss(),
                   output_dir=str(job.output_dir))
    return EXIT_FAILED if failed else EXIT_OK


class _Run:
    """One driver run: records shard results in the manifest, fails and assembles merges."""

    def __init__(self, job: JobSpec, sources: Sources, plan: Plan,
                 manifest: Manifest, progress: Progress) -> None:
        self.job, self.sources, self.plan, self.manifest, self.progress = job, sources, plan, manifest, progress
        self.keys_of: dict[str, list[Key]] = {m.name: [] for m in job.merges}
        for key in plan.units:
            self.keys_of[key[0]].append(key)
        self.failed: dict[str, str] = {}  # merge -> error
        self.to_assemble: deque[str] | None = None  # while the workers run: merges to assemble on one

    # --- scheduling --------------------------------------------------------------------------
    def schedule(self, tasks: Sequence[Task], todo: set[Key]) -> None:
        import ray

        from pipeline.actors import WorkerPool, hooks_from_env

        cluster = ray.cluster_resources()
        res = resolve_resources(self.job, cluster)
        count = min(res.workers, len(tasks))
        self._check_fits(res, count, cluster)
        pool = WorkerPool(count, num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker,
                          hooks=hooks_from_env(), max_in_flight=self.job.max_in_flight_per_worker)
        self.progress.event("workers", workers=count, cpus_per_worker=res.cpus_per_worker,
                            gpus_per_worker=res.gpus_per_worker, tasks=len(tasks))
        pending: deque[Task] = deque(tasks)
        crashes: dict[tuple[str, str], int] = {}
        self.to_assemble = deque()  # merges whose shards are all done: assembled on a worker, first in line
        try:
            while pending or self.to_assemble or pool.busy():
                while (pending or self.to_assemble) and (index := pool.free()) is not None:
                    if self.to_assemble:
                        merge = self.to_assemble.popleft()
                        work = AssemblyWork(output_dir=str(self.job.output_dir), merge=self.job.merge(merge),
                                            rows=tuple(dict(self.manifest.rows[k]) for k in self.keys_of[merge]))
                        pool.submit(index, work, ("assemble", merge))
                        continue
                    task = pending.popleft()
                    merges = [m for m in task.merges if (m, task.shard) in todo and m not in self.failed]
                    if merges:
                        pool.submit(index, work_of(self.job, self.plan, task, merges), ("shard", task, merges))
                        self._started(task, merges, +1)
                        self.progress.running += 1
                for outcome in pool.wait(timeout=1.0):
                    kind, *what = outcome.payload
                    if kind == "assemble":
                        self._assembly_outcome(outcome, what[0], crashes)
                        continue
                    task, merges = what
                    self.progress.running -= 1
                    if outcome.records is not None:
                        records = outcome.records
                    elif not outcome.started:  # it waited on a worker that died: not an attempt
                        self._started(task, merges, -1)
                        pending.appendleft(task)
                        continue
                    else:
                        key = (task.group, task.shard)
                        crashes[key] = crashes.get(key, 0) + 1
                        if crashes[key] <= self.job.retries:
                            self.progress.event("retry", shard=task.shard, merges=len(merges),
                                                crashes=crashes[key], error=outcome.error[:300])
                            pending.appendleft(task)
                            continue
                        records = [_failed(m, task.shard, f"the worker died {crashes[key]} times on this shard: "
                                                          f"{outcome.error[:300]}") for m in merges]
                    for record in records:
                        self.record(record)
                self.progress.tick()
                self.manifest.save(every=1.0)
        finally:
            self.to_assemble = None
            pool.close()

    def _assembly_outcome(self, outcome, merge: str, crashes: dict[tuple[str, str], int]) -> None:
        """Record what became of ``merge``'s assembly on a worker (a crash is retried like a shard's)."""
        if outcome.records is None:
            key = ("assemble", merge)
            if outcome.started:
                crashes[key] = crashes.get(key, 0) + 1
                if crashes[key] > self.job.retries:
                    self.fail(merge, f"assembly: the worker died {crashes[key]} times: {outcome.error[:300]}")
                    return
                self.progress.event("retry", merge=merge, assembly=True, crashes=crashes[key],
                                    error=outcome.error[:300])
            self.to_assemble.appendleft(merge)
            return
        record = outcome.records[0]
        if record["status"] != "done":
            self.fail(merge, str(record["error"]))
            return
        self._assembled(merge, Path(str(record["path"])), str(record["sha256"]), float(record["seconds"]),
                        by=str(record["worker"]))

    def _started(self, task: Task, merges: Sequence[str], step: int) -> None:
        """Count (+1) or take back (-1) an attempt of ``task`` for ``merges``."""
        now = time.time()
        for merge in merges:
            row = self.manifest.rows[(merge, task.shard)]
            self.manifest.update((merge, task.shard), status="running" if step > 0 else "pending",
                                 attempt=int(row["attempt"] or 0) + step, started_at=row["started_at"] or now,
                                 error=None)

    def _check_fits(self, res: Resources, count: int, cluster: Mapping[str, float]) -> None:
        need_gpus, need_cpus = res.gpus_per_worker * count, res.cpus_per_worker * count
        if need_gpus > cluster.get("GPU", 0.0) or need_cpus > cluster.get("CPU", 0.0):
            log.warning("%d workers need %g CPUs and %g GPUs but the cluster has %g and %g now; "
                        "some wait until resources appear (set workers, cpus_per_worker, gpus_per_worker)",
                        count, need_cpus, need_gpus, cluster.get("CPU", 0.0), cluster.get("GPU", 0.0))

    # --- records and merges ------------------------------------------------------------------
    def record(self, record: Mapping[str, object]) -> None:
        key = (str(record["merge"]), str(record["shard"]))
        fields = {k: record.get(k) for k in ("status", "sha256", "bytes", "seconds", "error", "worker", "device",
                                             "max_rss_mb", "max_gpu_mb")}
        self.manifest.update(key, **fields, finished_at=time.time())
        self.progress.shard_finished(failed=record["status"] != "done")
        merge = key[0]
        if record["status"] != "done":
            self.fail(merge, f"shard {key[1]}: {record['error']}")
        elif merge not in self.failed and all(self.manifest.rows[k]["status"] == "done" for k in self.keys_of[merge]):
            self.assemble_if_needed(merge)

    def fail(self, merge: str, error: str) -> None:
        if merge in self.failed:
            return
        self.failed[merge] = error
        for key in self.keys_of[merge]:
            if self.manifest.rows[key]["status"] == "pending":
                self.manifest.update(key, status="skipped", error=f"not run: the merge failed ({error[:200]})")
        self.progress.merges_failed += 1
        self.progress.event("merge_failed", merge=merge, error=error)

    def assemble_if_needed(self, merge: str) -> None:
        """Count ``merge`` done if an earlier run wrote it intact, else assemble it: on a worker while
        the workers run (queued first in line), in the driver otherwise (a resumed job whose shards were
        all done)."""
        rows = [self.manifest.rows[k] for k in self.keys_of[merge]]
        out = self.job.output_dir / merge / WEIGHTS_NAME
        recorded = rows[0]["output_sha256"] if rows else None
        if recorded and all(r["output_sha256"] == recorded for r in rows) and _output_sha256(out) == recorded:
            self.progress.merges_done += 1  # written by an earlier run, intact
            return
        if self.to_assemble is not None:
            self.to_assemble.append(merge)
            return
        started = time.perf_counter()
        spec = self.job.merge(merge)
        try:
            path, sha = assemble(self.job.output_dir, spec, self.sources[spec.adapter_set], rows)
        except (ValueError, OSError) as err:
            self.fail(merge, f"assembly: {_one_line(err)}")
            return
        self._assembled(merge, path, sha, time.perf_counter() - started)

    def _assembled(self, merge: str, path: Path, sha: str, seconds: float, by: str = "driver") -> None:
        for key in self.keys_of[merge]:
            self.manifest.update(key, output_sha256=sha)
        self.manifest.save(every=1.0)  # a crash before the next save costs writing this adapter again
        self.progress.merges_done += 1
        self.progress.event("merge_written", merge=merge, path=str(path), seconds=round(seconds, 3), by=by)

    def worker_max_rss(self) -> float | None:
        values = [float(r["max_rss_mb"]) for r in self.manifest.rows.values() if r.get("max_rss_mb") is not None]
        return max(values) if values else None


def _output_sha256(path: Path) -> str | None:
    """The sha256 of a merged adapter's weights file (hashed once per version of it); None if it is missing."""
    try:
        return known_sha256(path)
    except OSError:
        return None


def prune_shards(output_dir: Path, rows: Iterable[Mapping[str, object]], merges: Iterable[str]) -> list[Path]:
    """Delete what under ``output_dir/.shards`` no longer serves the job; returns what it deleted.

    That is: the shard directories of merges the job no longer has (their manifest rows were
    dropped when the job changed; their adapter directories stay), the bases files that no finished
    shard names (an earlier run's, before its adapters changed), and temp files that killed writers
    left. Run it when no task is in flight. A shard whose file cannot be read is not finished (the
    next run redoes it and writes its bases again). Merge names never start with '.', so
    ``.shards/.bases`` is no merge's directory.
    """
    shards = output_dir / SHARD_DIR
    if not shards.is_dir():
        return []
    keep = set()
    for row in rows:
        if row["status"] == "done" and row["path"]:
            bases = bases_of(output_dir / str(row["path"]))
            if bases is not None:
                keep.add(bases.resolve())
    wanted, removed = set(merges), []
    for directory in sorted(shards.iterdir()):
        if directory.is_dir() and not directory.name.startswith(".") and directory.name not in wanted:
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
        elif directory.is_dir() and directory.name in wanted:
            stale = [f for f in directory.iterdir() if f.name.startswith(".") and f.name.endswith(".tmp")]
            for f in stale:
                f.unlink(missing_ok=True)
            removed += stale
    for path in sorted((shards / BASES_DIR).glob("*/*")):
        if path.is_file() and path.resolve() not in keep:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _failed(merge: str, shard: str, error: str) -> dict[str, object]:
    return {"merge": merge, "shard": shard, "status": "failed", "error": error}


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return " ".join(text[0].split()) if text else type(err).__name__
