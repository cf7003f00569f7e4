"""The manifest: Parquet that pyarrow reads as a file or a directory dataset, replaced atomically,
and the resume rule (a done shard whose file still has its checksum is never redone)."""

from __future__ import annotations

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch

from coremerge.types import LowRank
from pipeline.config import load_job
import pipeline.manifest
from coremerge import peft_io
from pipeline.manifest import SCHEMA, Manifest, manifest_path, read_manifest
from pipeline.plan import make_plan
from pipeline.worker import write_shard

from pipeline_helpers import write_job

JOB = """
output_dir: out
merges:
  - {name: a, adapters: [adapters/snli, adapters/mnli]}
  - {name: b, adapters: [adapters/snli, adapters/rte], method: ties}
"""


def finish_all(manifest, plan):
    """Every shard done, with a (small, made-up) shard file of its own."""
    for key, unit in plan.units.items():
        lowrank = LowRank(a=torch.ones(1, 3), b=torch.ones(2, 1))
        meta = {"merge": key[0], "shard": key[1], "fingerprint": unit.fingerprint}
        path, sha, size = write_shard(manifest.output_dir / unit.directory, key[1], {m: lowrank for m in unit.modules},
                                      meta=meta)
        manifest.update(key, status="done", sha256=sha, attempt=1, seconds=0.5, bytes=size,
                        path=str(path.relative_to(manifest.output_dir)))


def shard_file(job, key):
    """The shard file that the saved manifest records for ``key``."""
    [row] = [r for r in read_manifest(job.output_dir).to_pylist() if (r["merge"], r["shard"]) == key]
    return job.output_dir / row["path"]


def finished_job(tmp_path):
    """JOB with every shard finished and the manifest saved, as a run leaves it; (job, plan)."""
    job, sources = load_job(write_job(tmp_path / "job.yaml", JOB))
    plan = make_plan(job, sources)
    manifest = Manifest(job.output_dir)
    manifest.reconcile(plan)
    finish_all(manifest, plan)
    manifest.save()
    return job, plan


def test_written_atomically_and_readable_by_pyarrow(tmp_path, adapters):
    job, sources = load_job(write_job(tmp_path / "job.yaml", JOB))
    plan = make_plan(job, sources)
    manifest = Manifest(job.output_dir)
    assert manifest.reconcile(plan) == set(plan.units)
    finish_all(manifest, plan)
    manifest.save()
    assert manifest_path(job.output_dir) == job.output_dir / "manifest" / "manifest.parquet"
    assert sorted(p.name for p in (job.output_dir / "manifest").iterdir()) == ["manifest.parquet"]  # no temp file left
    for table in (pq.read_table(job.output_dir / "manifest"), ds.dataset(job.output_dir / "manifest").to_table(),
                  read_manifest(job.output_dir)):
        assert table.schema.names == SCHEMA.names
        assert table.num_rows == len(plan.units) == 6
        assert set(table.column("status").to_pylist()) == {"done"}
    required = {"merge", "shard", "status", "path", "sha256", "attempt", "seconds", "error", "max_rss_mb"}
    assert required <= set(SCHEMA.names)


def test_reconcile_keeps_intact_shards_only(tmp_path, adapters):
    job, plan = finished_job(tmp_path)

    tampered = ("a", "layer-001")
    (shard_file(job, tampered)).write_bytes(b"not what was written")
    missing = ("b", "layer-002")
    (shard_file(job, missing)).unlink()
    again = Manifest.load(job.output_dir)
    todo = again.reconcile(plan)
    assert todo == {tampered, missing}
    assert again.rows[tampered]["status"] == "pending" and again.rows[tampered]["attempt"] == 1  # attempts carry on
    assert all(again.rows[k]["status"] == "done" for k in plan.units if k not in todo)

    # new options for merge b: all its shards are redone, from attempt 0; a's stay done
    write_job(tmp_path / "job.yaml", JOB.replace("method: ties}", "method: ties, alpha: 0.5}"))
    job2, sources2 = load_job(tmp_path / "job.yaml")
    todo2 = Manifest.load(job.output_dir).reconcile(make_plan(job2, sources2))
    assert {k for k in todo2 if k[0] == "b"} == {k for k in plan.units if k[0] == "b"}
    assert {k for k in todo2 if k[0] == "a"} == {tampered}


def test_resume_checks_on_threads_find_the_same_damaged_shards(tmp_path, adapters, monkeypatch):
    """A resumed run reads and hashes the finished shard files several at a time; the verdict is the
    one a single thread gives: exactly the damaged files (same size, one byte changed) are redone."""
    job, plan = finished_job(tmp_path)
    damaged = set(sorted(plan.units)[::3])
    for key in damaged:
        path = shard_file(job, key)
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF  # the last byte of the last tensor
        path.write_bytes(bytes(data))
    verdicts = []
    for threads in (1, 8):
        monkeypatch.setattr(pipeline.manifest, "CHECK_THREADS", threads)
        peft_io._KNOWN.clear()  # as in a new driver process: every file is read and hashed again
        verdicts.append(Manifest.load(job.output_dir).reconcile(plan))
    assert len(plan.units) >= 6 and verdicts[0] == verdicts[1] == damaged


def test_throttled_saves_wait_twenty_times_the_last_save(tmp_path, monkeypatch):
    """Each save rewrites every row, so a big job's periodic saves space themselves by their cost:
    at most every ``every`` seconds and every 20 times the last save's duration; a save without
    ``every`` always writes."""
    clock = [1000.0]
    monkeypatch.setattr(pipeline.manifest.time, "monotonic", lambda: clock[0])
    writes = []
    real_write = pipeline.manifest.pq.write_table

    def slow_write(table, where):  # a save that takes 0.5 s on the fake clock
        writes.append(clock[0])
        clock[0] += 0.5
        real_write(table, where)

    monkeypatch.setattr(pipeline.manifest.pq, "write_table", slow_write)
    manifest = Manifest(tmp_path)
    manifest.rows[("m", "layer-000")] = manifest.blank(("m", "layer-000"), ["x"], "f", attempt=0)

    def touch_and_save(at: float, **kw) -> None:
        clock[0] = at
        manifest.update(("m", "layer-000"), attempt=int(at))
        manifest.save(**kw)

    touch_and_save(1000.0)  # written; took 0.5 s -> the next throttled one waits 10 s from its start
    touch_and_save(1002.0, every=1.0)  # skipped
    touch_and_save(1009.9, every=1.0)  # skipped
    touch_and_save(1010.0, every=1.0)  # written
    touch_and_save(1011.0)  # unthrottled: written
    assert writes == [1000.0, 1010.0, 1011.0]
    assert read_manifest(tmp_path).column("attempt").to_pylist() == [1011]


def test_unplanned_rows_are_dropped(tmp_path, adapters):
    job, sources = load_job(write_job(tmp_path / "job.yaml", JOB))
    manifest = Manifest(job.output_dir)
    manifest.reconcile(make_plan(job, sources))
    manifest.save()
    write_job(tmp_path / "job.yaml", JOB.split("  - {name: b")[0])
    job2, sources2 = load_job(tmp_path / "job.yaml")
    manifest2 = Manifest.load(job.output_dir)
    manifest2.reconcile(make_plan(job2, sources2))
    assert {m for m, _ in manifest2.rows} == {"a"}


def test_one_driver_per_output_dir(tmp_path):
    import pytest

    from pipeline.manifest import JobBusyError, job_lock

    with job_lock(tmp_path / "out"):
        with pytest.raises(JobBusyError, match="another driver is running a job in"):
            with job_lock(tmp_path / "out"):
                pass
    with job_lock(tmp_path / "out"):  # released
        pass
    assert [p.name for p in (tmp_path / "out" / "manifest").iterdir()] == [".lock"]
