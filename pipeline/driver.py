"""The driver: validate, plan, schedule shards and assemblies on merge actors, record, resume.

``python -m pipeline run job.yaml`` calls :func:`run_job_file`. Without a cluster address
(``RAY_ADDRESS`` unset, as on a laptop) it starts a local Ray instance for the job and stops
it at the end; under ``ray job submit`` it joins the job's cluster. A run that finds nothing
left to merge (every shard done, at most adapters to write again) does not start Ray at all.

Exit status: 0 every merge written; 1 some merge failed, or no merge actor could be placed, or
the manifest could not be saved (see ``python -m pipeline status``); 2 bad job file, or another
driver runs the same output_dir (nothing started); 130 interrupted (Ctrl-C), 143 stopped
(SIGTERM: ``ray job stop``, a Kubernetes eviction). Interrupted or stopped, the driver saves the
manifest, stops the actors and the local Ray it started, says so in one line (``{"event":
"interrupted"}`` in JSON mode), and the same command resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from coremerge.errors import AdapterError
from coremerge.safetensors_file import FileVersion, remember_sha256

from pipeline import hashcache
from pipeline.assemble import WEIGHTS_NAME, AssemblyWork, assemble, output_digest, owns_output
from pipeline.config import JobSpec, JobSpecError, Sources, load_job
from pipeline.files import clean_leftovers, prune_shards
from pipeline.liveness import Heartbeat
from pipeline.manifest import MANIFEST_DIR, JobBusyError, Key, Manifest, in_threads, job_lock
from pipeline.plan import Plan, Task, make_plan, work_of
from pipeline.progress import Progress

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_BAD_SPEC, EXIT_INTERRUPTED, EXIT_STOPPED = 0, 1, 2, 130, 143
PARTIAL_PLACEMENT_GRACE = 10.0  # seconds after the first actor is placed before the others count as unplaceable


class RayUnavailable(RuntimeError):
    """Ray could not be started or joined (the driver reports it in one line; exit 1)."""


class Stopped(KeyboardInterrupt):
    """SIGTERM (``ray job stop``, an eviction) or SIGINT, raised in the driver's main thread.

    A KeyboardInterrupt, because Ray's blocking calls turn only that into an interruption (any other
    exception raised by a signal handler inside ``ray.wait`` comes out as a SystemError); Ray may
    raise a plain KeyboardInterrupt in its place, so :func:`_signal_name` reads the signal noted here.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: list[int] = []  # signals caught by this process, in order


def _on_signal(signum: int, _frame: object) -> None:
    # once: a second signal while the driver saves and stops what it started must not cut that short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _received.append(signum)
    raise Stopped(signum)


def _signum(err: KeyboardInterrupt) -> int:
    """The signal behind ``err``: the one our handler noted last (SIGINT when none was)."""
    return getattr(err, "signum", None) or (_received[-1] if _received else signal.SIGINT)


def _catch_signals() -> None:
    """SIGTERM and SIGINT raise :class:`Stopped` (again after ``ray.init``, which sets its own)."""
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)


def run_job_file(path: Path, *, progress: Progress | None = None) -> int:
    """Run the job in ``path`` to completion (resuming what an earlier run left); exit status."""
    main_thread = _is_main_thread()  # signal handlers can only be set there
    saved = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) if main_thread else None
    if main_thread:
        _catch_signals()
    try:
        return _run_job_file(path, progress, catch=main_thread)
    except KeyboardInterrupt as stop:  # before the job held its lock: nothing to save
        signum = _signum(stop)
        print(f"pipeline: {signal.Signals(signum).name}: stopped before any work", file=sys.stderr)
        return EXIT_STOPPED if signum == signal.SIGTERM else EXIT_INTERRUPTED
    finally:
        if saved is not None:
            signal.signal(signal.SIGTERM, saved[0])
            signal.signal(signal.SIGINT, saved[1])


def _run_job_file(path: Path, progress: Progress | None, *, catch: bool) -> int:
    try:
        job, sources = load_job(path)
    except JobSpecError as err:
        print(f"pipeline: error: {err}", file=sys.stderr)
        return EXIT_BAD_SPEC
    try:
        with job_lock(job.output_dir):
            return _run_locked(job, sources, progress, catch=catch)
    except JobBusyError as err:
        print(f"pipeline: error: {err}", file=sys.stderr)
        return EXIT_BAD_SPEC
    except OSError as err:  # the lock file cannot be made: output_dir unwritable, full disk
        print(f"pipeline: error: {job.output_dir}: {err.strerror or err}", file=sys.stderr)
        return EXIT_BAD_SPEC


def _run_locked(job: JobSpec, sources: Sources, progress: Progress | None, *, catch: bool) -> int:
    heartbeat = Heartbeat(job.output_dir, job.path)
    heartbeat.start()
    started_ray = False

    def connect() -> None:
        nonlocal started_ray
        try:
            started_ray = _connect_ray()
        except Exception as err:  # noqa: BLE001  Ray would not start or join: one line, the job's state saved
            address = os.environ.get("RAY_ADDRESS")
            if "ray" in sys.modules:
                sys.modules["ray"].shutdown()  # whatever half started
            where = f"join the Ray cluster at {address}" if address else "start a local Ray"
            raise RayUnavailable(f"cannot {where}: {_one_line(err)}") from None
        if catch:
            _catch_signals()  # ray.init replaced our SIGTERM handler with its own

    progress = progress or Progress(merges=len(job.merges))
    state, status, reason = "failed", EXIT_FAILED, None
    try:
        status, reason = run_job(job, sources, progress=progress, connect=connect)
        state = "finished" if status == EXIT_OK else "failed"
    except KeyboardInterrupt as stop:
        name = signal.Signals(_signum(stop)).name
        status = EXIT_STOPPED if name == "SIGTERM" else EXIT_INTERRUPTED
        state, reason = "interrupted", f"stopped by {name}"
        progress.interrupted(signal=name)
        print(f"pipeline: {name}: stopped; the manifest is saved; run the same command again to resume",
              file=sys.stderr)
    except JobSpecError as err:  # found once the job's records were read (an output that is not ours)
        status, state, reason = EXIT_BAD_SPEC, "failed", str(err)
        print(f"pipeline: error: {err}", file=sys.stderr)
    except RayUnavailable as err:
        status, state, reason = EXIT_FAILED, "failed", str(err)
        print(f"pipeline: error: {err}", file=sys.stderr)
    except AdapterError as err:  # an input changed between validation and planning: nothing was merged
        status, state, reason = EXIT_FAILED, "failed", str(err)
        print(f"pipeline: error: {err}", file=sys.stderr)
    finally:
        heartbeat.end(state, status, reason)
        if started_ray:
            import ray

            ray.shutdown()
    return status


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _connect_ray() -> bool:
    """Join the cluster in RAY_ADDRESS, or start a local Ray; True if this call did either.

    The local Ray listens on 127.0.0.1 only and its token file is 0600 (pipeline.local_ray).
    """
    ray = sys.modules.get("ray")  # imported here only after local_ray set what Ray reads at import
    if ray is not None and ray.is_initialized():
        return False
    from pipeline.local_ray import join_ray, start_local_ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        join_ray()
    else:
        start_local_ray(num_cpus=os.cpu_count())
    return True


@dataclasses.dataclass(frozen=True)
class Resources:
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float


def resolve_resources(job: JobSpec, cluster: Mapping[str, float]) -> Resources:
    """The job's worker settings, with defaults taken from the cluster's resources.

    GPU workers get the CPUs that come with their share of the GPUs (16 CPUs and 4 GPUs: 4 each), so
    that a node's CPUs are not left idle beside its GPUs; CPU workers get 2 each.

    Example:
        >>> job = JobSpec(path=Path("j.yaml"), output_dir=Path("out"), merges=())
        >>> resolve_resources(job, {"CPU": 16.0, "GPU": 4.0})   # a GPU's share of the CPUs each
        Resources(workers=4, cpus_per_worker=4.0, gpus_per_worker=1.0)
        >>> resolve_resources(job, {"CPU": 8.0})
        Resources(workers=4, cpus_per_worker=2.0, gpus_per_worker=0.0)
        >>> resolve_resources(dataclasses.replace(job, workers=2), {"CPU": 2.0})
        Resources(workers=2, cpus_per_worker=1.0, gpus_per_worker=0.0)
    """
    cluster_cpus, cluster_gpus = float(cluster.get("CPU", 1.0)), float(cluster.get("GPU", 0.0))
    gpus = job.gpus_per_worker if job.gpus_per_worker is not None else (1.0 if cluster_gpus >= 1 else 0.0)
    if job.cpus_per_worker is not None:
        cpus = job.cpus_per_worker
    elif gpus > 0:  # the CPUs that come with that share of the GPUs (torch threads of the actor's host-side work)
        cpus = max(1.0, float(math.floor(cluster_cpus * min(gpus, cluster_gpus or gpus) / max(cluster_gpus, gpus))))
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


class PlacementError(RuntimeError):
    """No merge actor could be placed (or stayed alive) for ``placement_timeout_s``; one line."""


def run_job(job: JobSpec, sources: Sources, *, progress: Progress | None = None,
            connect: Callable[[], None] | None = None) -> tuple[int, str | None]:
    """Run a validated job; (exit status, reason when it is not 0). ``connect`` starts or joins Ray,
    called only if there are shards to merge (default: ``ray`` must be initialised already)."""
    job.output_dir.mkdir(parents=True, exist_ok=True)
    progress = progress or Progress(merges=len(job.merges))
    removed = clean_leftovers(job.output_dir, [job.output_dir / MANIFEST_DIR])
    hashcache.load(job.output_dir)
    plan = make_plan(job, sources)  # hashes every input not in the cache (AdapterError: it changed meanwhile)
    manifest = Manifest.load(job.output_dir)
    if manifest.damaged:
        progress.warn("manifest_damaged", f"the manifest was damaged ({manifest.damaged}); it is rebuilt from the "
                                          f"shard files on disk", reason=manifest.damaged)
    owned = {m.name for m in job.merges if any(r.get("output_sha256") for r in manifest.of_merge(m.name))}
    for merge in job.merges:  # never replace a directory this tool did not write (point 1 of the contract)
        if not owns_output(job.output_dir / merge.name, known=merge.name in owned):
            raise JobSpecError(f"{job.path}: {merge.where}: {job.output_dir / merge.name} exists and is not an adapter "
                               f"coremerge wrote (no merge_report.json, not in the manifest); move it away or pick "
                               f"another merge name")
    todo = manifest.reconcile(plan)
    run = _Run(job, sources, plan, manifest, progress, owned)
    run.save()
    run.save_hashes()
    progress.begin(total=len(plan.units), done=len(plan.units) - len(todo))
    progress.event("start", job=str(job.path), output_dir=str(job.output_dir), merges=len(job.merges),
                   shards=len(plan.units), to_do=len(todo), leftovers_removed=len(removed))
    reason = None
    try:
        finished = [m.name for m in job.merges if not any(key in todo for key in run.keys_of[m.name])]
        run.check_outputs(finished)
        for merge in finished:  # finished in an earlier run: assemble if that did not happen
            run.assemble_if_needed(merge)
        tasks = [task for task in plan.tasks if any((m, task.shard) in todo for m in task.merges)]
        if tasks:
            if connect is not None:
                connect()
            try:
                run.schedule(tasks, todo)
            except PlacementError as err:
                reason = str(err)
                run.not_placed(reason)
    except KeyboardInterrupt as stop:
        run.stopped(signal.Signals(_signum(stop)).name)
        raise
    finally:
        saved = run.save(final=True)
        run.save_hashes()
    removed = prune_shards(job.output_dir, manifest.rows.values(), [m.name for m in job.merges])
    if removed:
        progress.event("shards_pruned", paths=len(removed))
    failed = sorted(run.failed)
    progress.close(failed_merges=failed, errors={m: run.failed[m] for m in failed},
                   worker_max_rss_mb=run.worker_max_rss(), output_dir=str(job.output_dir))
    written = progress.merges_done
    print(f"pipeline: {written} of {len(job.merges)} merged adapters are in {job.output_dir}"
          + (f"; {len(failed)} failed ({', '.join(failed[:3])}{' ...' if len(failed) > 3 else ''})" if failed else "")
          + f". Per merge: python -m pipeline status {job.path}", file=sys.stderr)
    if reason is not None:
        print(f"pipeline: error: {reason}", file=sys.stderr)
        return EXIT_FAILED, reason
    if not saved:
        reason = f"the manifest could not be saved ({run.save_error}); the next run proves finished shards from disk"
        print(f"pipeline: error: {reason}", file=sys.stderr)
        return EXIT_FAILED, reason
    if failed:
        return EXIT_FAILED, f"{len(failed)} merge(s) failed: {', '.join(failed[:5])}"
    return EXIT_OK, None


class _Run:
    """One driver run: records shard results in the manifest, fails and assembles merges."""

    def __init__(self, job: JobSpec, sources: Sources, plan: Plan, manifest: Manifest, progress: Progress,
                 owned: set[str]) -> None:
        self.job, self.sources, self.plan, self.manifest, self.progress = job, sources, plan, manifest, progress
        self.owned = set(owned)  # merges whose output directory this job wrote before (the manifest says so)
        self.keys_of: dict[str, list[Key]] = {m.name: [] for m in job.merges}
        for key in plan.units:
            self.keys_of[key[0]].append(key)
        self.failed: dict[str, str] = {}  # merge -> error
        self.to_assemble: deque[str] | None = None  # while the workers run: merges to assemble on one
        self.save_error: str | None = None
        self._digests: dict[str, str | None] = {}
        self._hashes_warned = False

    # --- the manifest ------------------------------------------------------------------------
    def save_hashes(self) -> None:
        """Keep the sha256 of the inputs, shards and outputs for the next run (a cache: a failure costs
        the next run a re-hash, so it is one warning line, once)."""
        try:
            hashcache.save(self.job.output_dir, [src.weights_file for srcs in self.sources.values() for src in srcs])
        except OSError as err:
            if not self._hashes_warned:
                self._hashes_warned = True
                text = err.strerror or str(err)
                self.progress.warn("hashes_not_saved", f"cannot save the hash cache: {text}", error=text)

    def save(self, *, every: float = 0.0, final: bool = False) -> bool:
        """Save the manifest; a failure (a full disk) is reported once and the job goes on: the shard
        files prove themselves to the next run. False if the latest save failed."""
        try:
            self.manifest.save(every=every)
        except OSError as err:
            text = err.strerror or str(err)
            if self.save_error is None or final:
                self.progress.warn("manifest_not_saved", f"cannot save the manifest: {text}", error=text)
            self.save_error = text
            return False
        if not self.manifest.dirty:  # everything recorded is on disk
            self.save_error = None
        return self.save_error is None

    # --- scheduling --------------------------------------------------------------------------
    def schedule(self, tasks: Sequence[Task], todo: set[Key]) -> None:
        import ray

        from pipeline.actors import WorkerPool, hooks_from_env

        cluster = ray.cluster_resources()
        res = resolve_resources(self.job, cluster)
        count = min(res.workers, len(tasks))
        pool = WorkerPool(count, num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker,
                          hooks=hooks_from_env(), max_in_flight=self.job.max_in_flight_per_worker)
        self.progress.event("workers", workers=count, cpus_per_worker=res.cpus_per_worker,
                            gpus_per_worker=res.gpus_per_worker, tasks=len(tasks))
        pending: deque[Task] = deque(tasks)
        crashes: dict[tuple[str, str], int] = {}
        self.to_assemble = deque()  # merges whose shards are all done: assembled on a worker, first in line
        watch = _Watch(self.job, res, count)
        try:
            while pending or self.to_assemble or pool.busy():
                watch.placement(pool, self.progress)
                while (pending or self.to_assemble) and (index := pool.free()) is not None:
                    if self.to_assemble:
                        merge = self.to_assemble.popleft()
                        pool.submit(index, self._assembly_work(merge), ("assemble", merge))
                        continue
                    task = pending.popleft()
                    merges = [m for m in task.merges if (m, task.shard) in todo and m not in self.failed]
                    if merges:
                        pool.submit(index, work_of(self.job, self.plan, task, merges), ("shard", task, merges))
                        self._started(task, merges, +1)
                        self.progress.running += 1
                outcomes = pool.wait(timeout=1.0)
                for outcome in outcomes:
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
                watch.progressed(bool(outcomes))
                watch.stall(pool, self.progress, busy=bool(pending or self.to_assemble or pool.busy()))
                self.progress.tick()
                self.save(every=1.0)
        finally:
            self.to_assemble = None
            pool.close()

    def _assembly_work(self, merge: str) -> AssemblyWork:
        return AssemblyWork(output_dir=str(self.job.output_dir), merge=self.job.merge(merge),
                            rows=tuple(dict(self.manifest.rows[k]) for k in self.keys_of[merge]),
                            owned=merge in self.owned, key=self.plan.output_keys[merge],
                            inputs=self.plan.inputs[self.job.merge(merge).adapter_set])

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
        remember_hashes(record)
        self._assembled(merge, Path(str(record["path"])), str(record["sha256"]), str(record["digest"]),
                        float(record["seconds"]), by=str(record["worker"]))

    def _started(self, task: Task, merges: Sequence[str], step: int) -> None:
        """Count (+1) or take back (-1) an attempt of ``task`` for ``merges``."""
        now = time.time()
        for merge in merges:
            row = self.manifest.rows[(merge, task.shard)]
            self.manifest.update((merge, task.shard), status="running" if step > 0 else "pending",
                                 attempt=int(row["attempt"] or 0) + step, started_at=row["started_at"] or now,
                                 error=None)

    def not_placed(self, reason: str) -> None:
        """No actor could be placed: every shard not done says why (and stays to do)."""
        for key, row in self.manifest.rows.items():
            if row["status"] in ("pending", "running"):
                self.manifest.update(key, status="pending", error=f"not run: {reason}")

    def stopped(self, how: str) -> None:
        """The driver was stopped: shards in flight are to do again, and say why."""
        for key, row in self.manifest.rows.items():
            if row["status"] == "running":
                self.manifest.update(key, status="pending", error=f"interrupted ({how}) while it ran")

    # --- records and merges ------------------------------------------------------------------
    def record(self, record: Mapping[str, object]) -> None:
        key = (str(record["merge"]), str(record["shard"]))
        remember_hashes(record)
        fields = {k: record.get(k) for k in ("status", "sha256", "bytes", "seconds", "error", "worker", "device",
                                             "max_rss_mb", "max_gpu_mb")}
        if record.get("file"):
            fields["path"] = f"{self.plan.units[key].directory}/{record['file']}"
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
        self.save()  # a failure is on disk at once: never only in the last save

    def check_outputs(self, merges: Sequence[str]) -> None:
        """Check every file of the adapters of ``merges`` that earlier runs wrote, several at a time."""
        digests = in_threads(lambda m: output_digest(self.job.output_dir / m, self.plan.output_keys[m]), list(merges))
        self._digests.update(zip(merges, digests))

    def assemble_if_needed(self, merge: str) -> None:
        """Count ``merge`` done if an earlier run wrote it intact (every file of its directory as it was
        written, from the same inputs), else assemble it: on a worker while the workers run (queued first
        in line), in the driver otherwise (a resumed job whose shards were all done)."""
        rows = [self.manifest.rows[k] for k in self.keys_of[merge]]
        recorded = rows[0]["output_digest"] if rows else None
        if recorded and all(r["output_digest"] == recorded for r in rows):
            digest = self._digests.pop(merge) if merge in self._digests else \
                output_digest(self.job.output_dir / merge, self.plan.output_keys[merge])
            if digest == recorded:
                self.progress.merges_done += 1  # written by an earlier run, intact
                return
        if self.to_assemble is not None:
            self.to_assemble.append(merge)
            return
        started = time.perf_counter()
        spec = self.job.merge(merge)
        try:
            path, sha, digest = assemble(self.job.output_dir, spec, self.sources[spec.adapter_set], rows,
                                         owned=merge in self.owned, key=self.plan.output_keys[merge])
        except (ValueError, OSError) as err:
            self.fail(merge, f"assembly: {_one_line(err)}")
            return
        self._assembled(merge, path, sha, digest, time.perf_counter() - started)

    def _assembled(self, merge: str, path: Path, sha: str, digest: str, seconds: float, by: str = "driver") -> None:
        self.owned.add(merge)
        for key in self.keys_of[merge]:
            self.manifest.update(key, output_sha256=sha, output_digest=digest)
        self.save(every=1.0)  # a crash before the next save costs writing this adapter again
        self.progress.merges_done += 1
        self.progress.event("merge_written", merge=merge, path=str(path), seconds=round(seconds, 3), by=by)

    def worker_max_rss(self) -> float | None:
        values = [float(r["max_rss_mb"]) for r in self.manifest.rows.values() if r.get("max_rss_mb") is not None]
        return max(values) if values else None


class _Watch:
    """The scheduling loop's two alarms: actors that cannot be placed, and a stall."""

    def __init__(self, job: JobSpec, res: Resources, count: int) -> None:
        self.job, self.res, self.count = job, res, count
        self.unhealthy_since: float | None = time.monotonic()  # when the pool last had no healthy actor
        self.first_placed: float | None = None
        self.warned_partial = False
        self.last_progress = time.monotonic()
        self.last_stall_report: float | None = None

    def placement(self, pool, progress: Progress) -> None:
        """Warn once when some actors cannot be placed; raise PlacementError when none can."""
        now = time.monotonic()
        timeout = self.job.placement_timeout_s
        if pool.healthy() == 0:
            self.unhealthy_since = self.unhealthy_since or now
            if now - self.unhealthy_since >= timeout:
                raise PlacementError(self._why(f"no merge actor could be placed in {timeout:g} s"))
            return
        self.unhealthy_since = None
        self.first_placed = self.first_placed or now
        unplaced = pool.unplaced()
        if unplaced and not self.warned_partial and now - self.first_placed >= PARTIAL_PLACEMENT_GRACE:
            self.warned_partial = True
            progress.warn("workers_unplaced", self._why(f"{len(unplaced)} of {self.count} merge actors cannot be "
                                                        f"placed now; running on {self.count - len(unplaced)}"),
                          unplaced=len(unplaced), workers=self.count)

    def _why(self, what: str) -> str:
        import ray

        free = ray.available_resources()
        return (f"{what}: each asks for {self.res.cpus_per_worker:g} CPU and {self.res.gpus_per_worker:g} GPU, the "
                f"cluster has {free.get('CPU', 0.0):g} CPU and {free.get('GPU', 0.0):g} GPU free (set workers, "
                f"cpus_per_worker, gpus_per_worker in the job file)")

    def progressed(self, anything: bool) -> None:
        if anything:
            self.last_progress = time.monotonic()
            self.last_stall_report = None

    def stall(self, pool, progress: Progress, *, busy: bool) -> None:
        """Report, every ``stall_timeout_s``, when no work has finished for that long while work is pending."""
        now = time.monotonic()
        if pool.healthy() == 0:  # nothing placed yet (or all restarting): the placement alarm's case
            self.last_progress, self.last_stall_report = now, None
            return
        since = self.last_stall_report or self.last_progress
        if busy and now - since >= self.job.stall_timeout_s:
            self.last_stall_report = now
            actors = pool.describe(_describe_payload)
            idle = now - self.last_progress
            text = "; ".join(f"actor {a['actor']} {a['state']}" + (f" on {a['work']} for {a['for_s']} s"
                                                                    if a.get("work") else "") for a in actors)
            progress.warn("stall", f"no work finished for {idle:.0f} s: {text}", seconds=round(idle, 1),
                          actors=actors)


def remember_hashes(record: Mapping[str, object]) -> None:
    """Trust the hashes a worker computed of the files it wrote (:func:`pipeline.worker.hashed`), each for
    the version it wrote: the hash cache then spares the next run reading them."""
    for path, entry in dict(record.get("hashed") or {}).items():
        remember_sha256(path, entry[5], FileVersion(*entry[:5]))


def _describe_payload(payload: object) -> str:
    kind, *what = payload
    if kind == "assemble":
        return f"assembling {what[0]}"
    task, merges = what
    return f"{task.shard} of {', '.join(merges[:3])}{' ...' if len(merges) > 3 else ''}"


def _failed(merge: str, shard: str, error: str) -> dict[str, object]:
    return {"merge": merge, "shard": shard, "status": "failed", "error": error}


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return " ".join(text[0].split()) if text else type(err).__name__
