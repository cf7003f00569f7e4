"""``python -m pipeline status job.yaml`` and ``python -m pipeline plan job.yaml``: what a job has done
and what it would do, read from the job file, the adapters' headers and the job's records. Neither
starts Ray, takes the job's lock or writes anything.

``status`` prints the last run's liveness (see :mod:`pipeline.liveness`), then one line per merge
of THIS job file. Rows of the manifest count for a merge only when their fingerprint is the one
this job file gives that shard now: another job file on the same output_dir, or inputs changed
since, never pass for this job's work. Columns:

- ``merge``: the merge's name (its directory under output_dir).
- ``shards``: shards done / shards of the merge.
- ``state``: ``planned`` (nothing of this merge recorded for these inputs and options), ``pending``
  (shards left, none running), ``running`` (a live driver is merging it), ``interrupted`` (shards
  were running when their driver died), ``failed`` (a shard or the assembly failed: errors below),
  ``merged`` (every shard done, the adapter not written yet), ``done`` (the adapter is written).
- ``elapsed``: wall time from the merge's first shard start to its last shard end.
- ``work``: the merge's share of the workers' time, summed over its shards.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from coremerge.errors import AdapterError
from coremerge.peft_io import AdapterSource

from pipeline import hashcache
from pipeline.config import JobSpec, JobSpecError, Sources, load_job
from pipeline.liveness import judge
from pipeline.manifest import ManifestDamaged, read_manifest
from pipeline.plan import Plan, make_plan
from pipeline.worker import ShardWork

EXIT_OK, EXIT_FAILED, EXIT_BAD_SPEC = 0, 1, 2


def _load(path: Path) -> tuple[JobSpec, Sources, Plan] | None:
    try:
        job, sources = load_job(path, check_writable=False)
        hashcache.load(job.output_dir)  # read only: the inputs are hashed once per version, by the run
        return job, sources, make_plan(job, sources)
    except (JobSpecError, AdapterError) as err:  # AdapterError: an input changed while it was hashed
        print(f"pipeline: error: {err}", file=sys.stderr)
        return None


def _same_file(recorded: str, path: Path) -> bool:
    """Whether the job file a run recorded is ``path`` (typed relative or through a symlink, or not)."""
    try:
        return os.path.samefile(recorded, path)
    except OSError:  # the recorded one is gone: compare the names
        return Path(recorded).resolve() == Path(path).resolve()


def status_file(path: Path) -> int:
    """``python -m pipeline status job.yaml``: the last run's liveness and, per merge, its progress."""
    loaded = _load(path)
    if loaded is None:
        return EXIT_BAD_SPEC
    job, _, plan = loaded
    verdict = judge(job.output_dir)
    try:
        table = read_manifest(job.output_dir)
    except ManifestDamaged as err:
        print(f"last run: {verdict.words}")
        print(f"pipeline: error: the manifest is damaged ({err}); the next run rebuilds it from the shard files")
        return EXIT_FAILED
    if table is None:
        print(f"no manifest at {job.output_dir / 'manifest'}: the job has not started")
        return EXIT_FAILED
    print(f"last run: {verdict.words}")
    if verdict.state is not None and verdict.state.get("job") and not _same_file(str(verdict.state["job"]), job.path):
        print(f"note: the last run on {job.output_dir} was of another job file: {verdict.state['job']}")
    wanted = {key: unit.fingerprint for key, unit in plan.units.items()}
    rows = [r for r in table.to_pylist() if wanted.get((r["merge"], r["shard"])) == r["fingerprint"]]
    print("\n".join(status_table([m.name for m in job.merges], rows, alive=verdict.alive,
                                 shards={m.name: len(plan.units_of(m.name)) for m in job.merges})))
    others = table.num_rows - len(rows)
    if others:
        print(f"\n{others} rows of the manifest are another job's or older inputs': not counted above")
    return EXIT_OK


def status_table(merges: Sequence[str], rows: Sequence[Mapping[str, object]], *, alive: bool = True,
                 shards: Mapping[str, int] | None = None) -> list[str]:
    """Lines of ``python -m pipeline status``: per merge, shards done / total, state, elapsed, work.

    ``alive``: whether the driver that wrote ``running`` rows still runs (else they read
    ``interrupted``). ``shards``: each merge's planned shard count (default: its rows).
    """
    by_merge: dict[str, list[Mapping[str, object]]] = {m: [] for m in merges}
    for row in rows:
        by_merge.setdefault(str(row["merge"]), []).append(row)
    width = max([len("merge")] + [len(m) for m in by_merge])
    lines = [f"{'merge':<{width}}  {'shards':>9}  {'state':<11}  {'elapsed':>9}  {'work':>9}"]
    failures = []
    for merge, mrows in by_merge.items():
        done = sum(1 for r in mrows if r["status"] == "done")
        total = (shards or {}).get(merge, len(mrows)) or "?"
        failed = [r for r in mrows if r["status"] == "failed"]
        if not mrows:
            state = "planned"
        elif failed:
            state = "failed"
        elif done == total:
            state = "done" if any(r.get("output_sha256") for r in mrows) else "merged"
        elif any(r["status"] == "running" for r in mrows):
            state = "running" if alive else "interrupted"
        else:
            state = "pending"
        starts = [float(r["started_at"]) for r in mrows if r.get("started_at") is not None]
        ends = [float(r["finished_at"]) for r in mrows if r.get("finished_at") is not None]
        elapsed = f"{max(ends) - min(starts):.1f} s" if starts and ends else "-"
        work = f"{sum(float(r['seconds'] or 0.0) for r in mrows):.1f} s" if ends else "-"
        lines.append(f"{merge:<{width}}  {f'{done}/{total}':>9}  {state:<11}  {elapsed:>9}  {work:>9}")
        failures += [f"  {merge} {r['shard']} (attempt {r['attempt']}): {r['error']}" for r in failed]
    if failures:
        lines += ["", "failed shards:", *failures]
    return lines


def plan_file(path: Path) -> int:
    """``python -m pipeline plan job.yaml``: every merge the job expands to, its shards, the groups of
    merges that share bases, the bytes to be written, and what is already done. Starts nothing."""
    from pipeline.manifest import Manifest
    from pipeline.plan import work_of
    from pipeline.worker import shard_bytes

    loaded = _load(path)
    if loaded is None:
        return EXIT_BAD_SPEC
    job, sources, plan = loaded
    manifest = Manifest.load(job.output_dir, keep_damaged=False)
    done = set(plan.units) - manifest.reconcile(plan)  # what a run would not redo
    print(f"job {job.path}: {len(job.merges)} merges, {len(plan.units)} shards, output_dir {job.output_dir}")
    if manifest.damaged:
        print(f"note: the manifest is damaged ({manifest.damaged}); a run rebuilds it from the shard files")
    shard_out: dict[str, int] = dict.fromkeys((m.name for m in job.merges), 0)
    adapter_out = dict(shard_out)
    bases_out = 0
    groups: dict[str, list[str]] = {}
    factored: dict[str, bool] = {}
    for task in plan.tasks:
        work = work_of(job, plan, task, task.merges)
        names, shared, sizes = shard_bytes(work, sources[task.adapters])
        bases_out += shared if any((m, task.shard) not in done for m in task.merges) and names else 0
        for merge in task.merges:
            if (merge, task.shard) not in done:
                shard_out[merge] += sizes[merge]
        groups.setdefault(task.group, list(task.merges))
        factored[task.group] = factored.get(task.group, False) or bool(names)
        _adapter_sizes(work, sources[task.adapters], adapter_out)
    width = max(len("merge"), *(len(m.name) for m in job.merges))
    print()
    print(f"{'merge':<{width}}  {'method':<9}  {'space':<5}  {'alpha':>6}  {'rank':>5}  {'dtype':<8}  "
          f"{'shards':>8}  params")
    for merge in job.merges:
        units = plan.units_of(merge.name)
        finished = sum(1 for u in units if (u.merge, u.shard) in done)
        o = merge.options
        params = ", ".join(f"{k}={v}" for k, v in sorted(o.params.items())) or "-"
        print(f"{merge.name:<{width}}  {o.method:<9}  {o.space:<5}  {o.alpha:>6g}  {o.rank or '-':>5}  "
              f"{merge.out_dtype:<8}  {f'{finished}/{len(units)}':>8}  {params}")
    print()
    print("adapter sets (their merges share each module's bases, built once per shard):")
    for group, members in groups.items():
        adapters = job.merge(members[0]).adapters
        shared = "bases file shared by the shard files" if factored[group] else "plain shard files"
        print(f"  {group}: {len(members)} merge(s) of {len(adapters)} adapters ({shared}): "
              f"{', '.join(members[:6])}{' ...' if len(members) > 6 else ''}")
    todo_shards = len(plan.units) - len(done)
    print()
    print(f"to do: {todo_shards} of {len(plan.units)} shards; about {_mb(sum(shard_out.values()) + bases_out)} of "
          f"shard files and {_mb(sum(adapter_out.values()))} of merged adapters "
          f"({len(job.merges)} adapter directories, rewritten only if missing or damaged)")
    return EXIT_OK


def _adapter_sizes(work: ShardWork, sources: Sequence[AdapterSource], out: dict[str, int]) -> None:
    """Add each merge's adapter bytes for ``work``'s modules to ``out``: its plain LoRA factors, which
    is what a shard file of one merge alone holds."""
    from pipeline.worker import shard_bytes

    for target in work.targets:
        out[target.merge] += shard_bytes(dataclasses.replace(work, targets=(target,)), sources)[2][target.merge]


def _mb(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB" if size < 2**30 else f"{size / 2**30:,.2f} GiB"
