"""The Ray actor that runs shards: long-lived, one per GPU (or per few CPUs), restarted on a crash.

State built once per process: torch's thread count, the device, and a small cache of opened
adapter sets (headers only). The work itself is :func:`pipeline.worker.run_shard`.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import ray
import torch

from coremerge.allocator import keep_freed_memory
from coremerge.merge import open_all
from coremerge.peft_io import AdapterSource
from coremerge.safetensors_file import FileVersion

from pipeline.assemble import AssemblyWork, run_assembly
from pipeline.worker import ShardWork, changed_input, failed_records, run_shard

log = logging.getLogger(__name__)

MAX_OPEN_SETS = 4  # adapter sets whose headers an actor keeps open
PING_EVERY = 1.0  # seconds between health checks of a restarting actor

# Test hooks, passed from the driver's environment to its actors (see pipeline.worker):
# COREMERGE_TEST_CRASH_ONCE=<marker path>, COREMERGE_TEST_SHARD_DELAY=<seconds>. Tests only.
TEST_HOOKS = {"COREMERGE_TEST_CRASH_ONCE": "crash_once", "COREMERGE_TEST_SHARD_DELAY": "shard_delay"}


def hooks_from_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    return {hook: environ[var] for var, hook in TEST_HOOKS.items() if environ.get(var)}


class MergeWorker:
    """Runs shards on this process's device (started and supervised by :class:`WorkerPool`)."""

    def __init__(self, num_cpus: float, num_gpus: float, hooks: Mapping[str, str]) -> None:
        keep_freed_memory()  # this process is ours for the job: tensors reuse pages instead of faulting in new ones
        torch.set_num_threads(max(1, int(num_cpus)))
        self.device = "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"
        if num_gpus > 0 and self.device == "cpu":
            log.warning("this worker was given %s GPU(s) but torch sees no CUDA device; merging on the CPU", num_gpus)
        self.hooks = dict(hooks)
        self._sources: OrderedDict[tuple[str, ...], list[AdapterSource]] = OrderedDict()

    def ping(self) -> str:
        """``host:pid`` of this actor's process (the pool's health check and stall report)."""
        return f"{socket.gethostname()}:{os.getpid()}"

    def run(self, work: ShardWork | AssemblyWork) -> list[dict[str, object]]:
        """A shard's records, or an assembly's one record (see run_shard and run_assembly)."""
        try:
            sources = self._open(work.adapters)  # as the files are now: compared with what the driver planned
            error = changed_input(sources, work.inputs) if work.inputs else None
        except (ValueError, OSError) as err:
            error = "cannot open the adapters: " + " ".join(str(err).split())
        if error is not None:
            if isinstance(work, AssemblyWork):
                return [{"merge": work.merge.name, "status": "failed", "error": error}]
            return failed_records(work, error)
        if isinstance(work, AssemblyWork):
            return run_assembly(work, sources, device=self.device)
        return run_shard(work, sources, device=self.device, hooks=self.hooks)

    def _open(self, adapters: tuple[str, ...]) -> list[AdapterSource]:
        """The adapters, opened once per version of their files: a set whose weights file changed since
        (one stat each) is opened again, so that the caller compares what the files hold now."""
        if adapters in self._sources and all(_unchanged(src) for src in self._sources[adapters]):
            self._sources.move_to_end(adapters)
        else:
            self._sources[adapters] = open_all(adapters)
            while len(self._sources) > MAX_OPEN_SETS:
                self._sources.popitem(last=False)
        return self._sources[adapters]


def _unchanged(src: AdapterSource) -> bool:
    try:
        return FileVersion.of_path(src.weights_file) == src.weights_version
    except OSError:
        return False


@dataclass(frozen=True)
class Outcome:
    """What became of one submitted shard.

    ``records`` when the worker returned; else ``error`` and ``started``: True when the worker
    died while running this shard (a crash to count), False when it died before starting it
    (the shard waited in its queue: resubmit it, it was not an attempt).
    """

    payload: object
    records: list[dict[str, object]] | None = None
    error: str | None = None
    started: bool = True


class WorkerPool:
    """Long-lived merge actors with bounded in-flight work and crash recovery.

    An actor gets work only once it has answered a ping, that is once Ray has placed it and its
    process runs: actors that cannot be placed (the cluster lacks the CPUs or GPUs they ask for)
    never hold a shard, and the job runs on those that can (:meth:`unplaced` tells which wait).
    A crashed actor is restarted by Ray (``max_restarts=-1``); Ray does not retry its tasks
    (``max_task_retries=0``): :meth:`wait` reports them and the driver resubmits, so that it
    counts attempts itself. An actor's tasks run one at a time in submission order, so when it
    dies the oldest of its in-flight shards is the one it was running; the others never started.
    Until a restarted actor answers a ping it gets no new work.
    """

    def __init__(self, count: int, *, num_cpus: float, num_gpus: float, hooks: Mapping[str, str] | None,
                 max_in_flight: int) -> None:
        self._remote = ray.remote(MergeWorker).options(num_cpus=num_cpus, num_gpus=num_gpus,
                                                        max_restarts=-1, max_task_retries=0)
        self._args = (num_cpus, num_gpus, dict(hooks or {}))
        self.max_in_flight = max_in_flight
        self.started = time.monotonic()
        self.actors = [self._remote.remote(*self._args) for _ in range(count)]
        self._queues: list[deque[object]] = [deque() for _ in range(count)]  # in-flight refs, oldest first
        self._tasks: dict[object, tuple[int, int, object]] = {}  # ref -> (actor, sequence, payload)
        self._doomed: set[object] = set()  # refs queued on an actor that died: they never started
        self._placed: set[int] = set()  # actors that have answered a ping at least once
        self._recovering: dict[int, float] = {i: 0.0 for i in range(count)}  # actor -> when to ping next
        self._pings: dict[object, int] = {}
        self._where: dict[int, str] = {}  # actor -> host:pid of its process, from its last ping
        self._since: dict[int, float] = {}  # actor -> when its oldest in-flight task started (about)
        self._sequence = itertools.count()

    def free(self) -> int | None:
        """A healthy actor with room for another shard, the least loaded; None if there is none."""
        ready = [i for i in range(len(self.actors)) if i not in self._recovering
                 and len(self._queues[i]) < self.max_in_flight]
        return min(ready, key=lambda i: len(self._queues[i])) if ready else None

    def healthy(self) -> int:
        """How many actors are placed and answering now."""
        return len(self.actors) - len(self._recovering)

    def unplaced(self) -> list[int]:
        """Actors that have never answered a ping: Ray could not place them (yet)."""
        return [i for i in range(len(self.actors)) if i not in self._placed]

    def submit(self, index: int, work: ShardWork | AssemblyWork, payload: object) -> None:
        ref = self.actors[index].run.remote(work)
        if not self._queues[index]:
            self._since[index] = time.monotonic()
        self._queues[index].append(ref)
        self._tasks[ref] = (index, next(self._sequence), payload)

    def busy(self) -> bool:
        return bool(self._tasks)

    def wait(self, timeout: float) -> list[Outcome]:
        """Outcomes of the shards that finished within ``timeout`` seconds (maybe none)."""
        from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

        self._ping_recovering()
        refs = [*self._tasks, *self._pings]
        if not refs:
            time.sleep(min(timeout, 0.2))
            return []
        ready, rest = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready and rest:
            ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        outcomes = []
        for ref in sorted(ready, key=lambda r: self._tasks[r][1] if r in self._tasks else -1):
            if ref in self._pings:
                self._pinged(ref)
                continue
            index, _, payload = self._tasks.pop(ref)
            oldest = self._queues[index][0] is ref
            self._queues[index].remove(ref)
            self._since[index] = time.monotonic()
            try:
                outcomes.append(Outcome(payload, records=ray.get(ref)))
            except RayTaskError as err:  # run() catches what a shard raises: this is a bug
                outcomes.append(Outcome(payload, error=_cause(err)))
            except RayActorError as err:  # the worker process died: crash, OOM kill, lost node
                started = oldest and ref not in self._doomed
                self._doomed.discard(ref)
                if started:
                    self._doomed.update(self._queues[index])
                    self._lost(index, replace=isinstance(err, ActorDiedError))
                outcomes.append(Outcome(payload, error=_cause(err), started=started))
        return outcomes

    def describe(self, describe_payload: Callable[[object], str]) -> list[dict[str, object]]:
        """What each actor is doing, for the stall report: state, process, current work and since when."""
        now = time.monotonic()
        out = []
        for index in range(len(self.actors)):
            queue = self._queues[index]
            if index not in self._placed:
                state = "waiting to be placed"
            elif index in self._recovering:
                state = "restarting"
            else:
                state = "working" if queue else "idle"
            entry: dict[str, object] = {"actor": index, "state": state, "process": self._where.get(index)}
            if queue:
                entry.update(work=describe_payload(self._tasks[queue[0]][2]), queued=len(queue) - 1,
                             for_s=round(now - self._since.get(index, now), 1))
            out.append(entry)
        return out

    def _lost(self, index: int, *, replace: bool) -> None:
        if replace:  # dead for good (Ray gave up on it): start a fresh one
            self.actors[index] = self._remote.remote(*self._args)
        self._recovering[index] = time.monotonic() + PING_EVERY

    def _ping_recovering(self) -> None:
        now = time.monotonic()
        pinging = set(self._pings.values())
        for index, when in self._recovering.items():
            if index not in pinging and when <= now:
                self._pings[self.actors[index].ping.remote()] = index

    def _pinged(self, ref: object) -> None:
        from ray.exceptions import RayActorError

        index = self._pings.pop(ref)
        try:
            where = ray.get(ref)
        except RayActorError:
            self._recovering[index] = time.monotonic() + PING_EVERY
            return
        self._where[index] = str(where)
        self._placed.add(index)
        self._recovering.pop(index, None)

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def _cause(err: BaseException) -> str:
    cause = getattr(err, "cause", None) or err  # a RayTaskError carries the worker's exception
    lines = str(cause).strip().splitlines()
    return " ".join(lines[0].split()) if lines else type(cause).__name__
