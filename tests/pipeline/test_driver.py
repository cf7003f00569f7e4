"""The job on a real local Ray (the session's, 2 CPUs and 2 fake GPUs): output equal to
``coremerge merge``, sweeps, resume, a worker crash mid-shard, a failing merge in a batch."""

from __future__ import annotations

import os
from pathlib import Path
import subprocess
import sys

import pytest

from pipeline.config import load_job
from pipeline.driver import run_job_file
from pipeline.status import status_file
from pipeline.manifest import read_manifest

from pipeline_helpers import (assert_same_adapter, json_lines, max_relative_difference, poison, reference_merge,
                              write_job)

pytestmark = pytest.mark.usefixtures("ray_session")

BATCH = """
output_dir: out
workers: 2
gpus_per_worker: 0
cpus_per_worker: 1
merges:
  - name: nli-tsv
    adapters: [adapters/snli, adapters/mnli, {path: adapters/rte, weight: 0.5}]
    method: tsv
    alpha: 0.9
  - name: nli-dare
    adapters: [adapters/snli, adapters/mnli, adapters/rte]
    method: dare_ties
    params: {density: 0.5}
    seed: 3
  - name: nli-ties-r3
    adapters: [adapters/snli, adapters/mnli, adapters/rte]
    method: ties
    rank: 3
    dtype: bfloat16
  - name: nli-full
    adapters: [adapters/snli, adapters/mnli, adapters/rte]
    space: full
  - name: pair-iso
    adapters: [adapters/snli, adapters/mnli]
    method: iso_c
"""


def rows(output_dir):
    return {(r["merge"], r["shard"]): r for r in read_manifest(output_dir).to_pylist()}


def test_pipeline_equals_coremerge_merge(tmp_path, adapters, one_thread, capsys, monkeypatch):
    monkeypatch.setenv("COREMERGE_LOG_INTERVAL", "0")  # a progress line on every loop turn
    path = write_job(tmp_path / "job.yaml", BATCH)
    assert run_job_file(path) == 0
    job, _ = load_job(path)
    for spec in job.merges:  # the workers run 1 thread each: so does the reference, for identical bytes
        assert_same_adapter(job.output_dir / spec.name, reference_merge(spec, tmp_path / "ref" / spec.name))
    # the installed command, as a user runs it (all threads): within 1e-6, and here the very same bytes
    tsv = job.merge("nli-tsv")
    cli = subprocess.run([sys.executable, "-m", "coremerge", "merge", *tsv.adapters, "--weights", "1,1,0.5",
                          "--method", "tsv", "--alpha", "0.9", "--out", str(tmp_path / "cli")],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert max_relative_difference(job.output_dir / "nli-tsv", tmp_path / "cli") <= 1e-6
    assert_same_adapter(job.output_dir / "nli-tsv", tmp_path / "cli")

    table = rows(job.output_dir)
    assert len(table) == 4 * 3 + 3  # 4 merges of 3 adapters x 3 layers, the pair x 3 layers
    assert {r["status"] for r in table.values()} == {"done"} and {r["attempt"] for r in table.values()} == {1}
    assert all(r["max_rss_mb"] > 50 and r["seconds"] >= 0 for r in table.values())
    # no terminal: JSON log lines, with peak memory of the driver and the workers
    events = json_lines(capsys.readouterr().out)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "finished" and "progress" in kinds
    assert kinds.count("merge_written") == 5
    # every merge was assembled on a worker (a Ray actor process), not in this driver
    assembled_by = {e["by"] for e in events if e["event"] == "merge_written"}
    assert assembled_by <= {r["worker"] for r in table.values()} and f":{os.getpid()}" not in str(assembled_by)
    assert max(e["running"] for e in events if e["event"] == "progress") <= 2 * 2  # workers x max_in_flight
    assert events[-1]["done"] == events[-1]["total"] == 15 and events[-1]["failed_merges"] == []
    assert events[-1]["driver_max_rss_mb"] > 50 and events[-1]["worker_max_rss_mb"] > 50


SWEEP = """
output_dir: out
sweeps:
  - name: s
    adapters: [adapters/snli, adapters/mnli, adapters/rte]
    method: [ta, ties]
    alpha: [0.5, 1.0]
"""


def test_sweep_then_resume(tmp_path, adapters, one_thread, capsys):
    path = write_job(tmp_path / "job.yaml", SWEEP)  # workers and GPUs from the cluster: 2 fake GPUs
    assert run_job_file(path) == 0
    job, _ = load_job(path)
    assert [m.name for m in job.merges] == ["s-ta-a0.5", "s-ta-a1.0", "s-ties-a0.5", "s-ties-a1.0"]
    refs = {spec.name: reference_merge(spec, tmp_path / "ref" / spec.name) for spec in job.merges}
    for spec in job.merges:
        assert_same_adapter(job.output_dir / spec.name, refs[spec.name])
    workers = next(e for e in json_lines(capsys.readouterr().out) if e["event"] == "workers")
    assert (workers["workers"], workers["gpus_per_worker"], workers["tasks"]) == (2, 1.0, 3)  # one task per layer
    first = rows(job.output_dir)
    written = {n: (job.output_dir / n / "adapter_model.safetensors").stat().st_mtime_ns for n in refs}

    # the same command again: nothing is redone, nothing rewritten
    assert run_job_file(path) == 0
    assert rows(job.output_dir) == first
    assert {n: (job.output_dir / n / "adapter_model.safetensors").stat().st_mtime_ns for n in refs} == written

    # a shard file damaged and a merged adapter deleted: only that shard is redone, the adapter rewritten
    damaged = ("s-ties-a0.5", "layer-001")
    (job.output_dir / first[damaged]["path"]).write_bytes(b"garbage")
    import shutil

    shutil.rmtree(job.output_dir / "s-ta-a1.0")
    assert run_job_file(path) == 0
    again = rows(job.output_dir)
    redone = {k for k in first if again[k]["finished_at"] != first[k]["finished_at"]}
    assert redone == {damaged} and again[damaged]["attempt"] == 2
    assert {again[k]["attempt"] for k in again if k != damaged} == {1}
    for spec in job.merges:
        assert_same_adapter(job.output_dir / spec.name, refs[spec.name])
    # the sweep's shard files share one bases file per layer; one damaged: that layer is redone for
    # every member (one task), nothing else, and the adapters are the same
    bases = sorted((job.output_dir / ".shards" / ".bases").glob("*/layer-*.safetensors"))
    assert [b.name.split("-")[1] for b in bases] == ["000", "001", "002"]
    bases[2].write_bytes(b"garbage")
    orphan = bases[0].with_name("layer-000-0123456789abcdef.safetensors")  # an earlier run's, other adapters
    orphan.write_bytes(bases[0].read_bytes())
    (bases[0].parent / ".123.456.tmp").write_bytes(b"left by a killed writer")
    assert run_job_file(path) == 0
    # no finished shard names the orphan or the temp file: deleted at the end; the three in use stay
    assert sorted(bases[0].parent.iterdir()) == bases
    third = rows(job.output_dir)
    assert {k for k in again if third[k]["finished_at"] != again[k]["finished_at"]} == {(n, "layer-002") for n in refs}
    for spec in job.merges:
        assert_same_adapter(job.output_dir / spec.name, refs[spec.name])
    capsys.readouterr()
    assert status_file(path) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("last run: finished at ") and "(exit 0)" in lines[0]
    assert lines[1].split()[:3] == ["merge", "shards", "state"]
    assert [line.split()[:3] for line in lines[2:]] == [[n, "3/3", "done"] for n in refs]


def test_worker_crash_mid_shard_is_retried(tmp_path, adapters, one_thread, monkeypatch, capsys):
    marker = tmp_path / "crashed"
    monkeypatch.setenv("COREMERGE_TEST_CRASH_ONCE", str(marker))  # test hook: one worker os._exit(1)s mid-shard
    path = write_job(tmp_path / "job.yaml", BATCH.split("  - name: nli-dare")[0])
    assert run_job_file(path) == 0
    assert marker.exists()  # the crash happened
    job, _ = load_job(path)
    table = rows(job.output_dir)
    assert {r["status"] for r in table.values()} == {"done"}
    assert sorted(r["attempt"] for r in table.values()) == [1, 1, 2]  # the crashed shard ran twice
    assert_same_adapter(job.output_dir / "nli-tsv", reference_merge(job.merge("nli-tsv"), tmp_path / "ref"))
    assert "retry" in [e["event"] for e in json_lines(capsys.readouterr().out)]


def test_failing_merge_does_not_stop_the_batch(tmp_path, adapters, one_thread, capsys):
    path = write_job(tmp_path / "job.yaml", """
        output_dir: out
        workers: 1
        gpus_per_worker: 0
        cpus_per_worker: 1
        merges:
          - name: bad
            adapters: [adapters/snli, adapters/rte]
          - name: good
            adapters: [adapters/snli, adapters/mnli]
            method: tsv
    """)
    poison(adapters[2], "model.layers.1.mlp.up_proj")  # the header is fine: found only when layer 1 is read
    assert run_job_file(path) == 1
    job, _ = load_job(path)
    table = rows(job.output_dir)
    failed = table[("bad", "layer-001")]
    assert failed["status"] == "failed" and "NaN" in failed["error"] and "model.layers.1.mlp.up_proj" in failed["error"]
    assert not (job.output_dir / "bad").exists()
    assert_same_adapter(job.output_dir / "good", reference_merge(job.merge("good"), tmp_path / "ref"))
    finished = json_lines(capsys.readouterr().out)[-1]
    assert finished["failed_merges"] == ["bad"]
    assert status_file(path) == 0
    out = capsys.readouterr().out
    assert any(line.split()[:3] == ["bad", "1/3", "failed"] or line.split()[:2] == ["bad", "2/3"] for line in
               out.splitlines()), out
    assert "bad layer-001 (attempt 1): " in out and "NaN" in out


def test_prune_shards_keeps_what_the_job_uses(tmp_path):
    import torch

    from coremerge.types import FactoredLowRank, LowRank
    from pipeline.files import prune_shards
    from pipeline.worker import write_bases, write_shard

    out = tmp_path / "out"
    u, v = torch.eye(4)[:, :2].contiguous(), torch.eye(2, 5)
    bases_dir = out / ".shards" / ".bases" / "set-1"
    used = write_bases(bases_dir, "layer-000", {"m": (u, v)})
    stale, _ = write_bases(bases_dir, "layer-000", {"m": (2 * u, v)})  # an earlier run's bases
    factored = {"m": FactoredLowRank(u=u, x=torch.eye(2), y=None, v=v)}
    kept, sha, _ = write_shard(out / ".shards" / "a", "layer-000", factored, meta={}, bases_file=used)
    older, _, _ = write_shard(out / ".shards" / "a", "layer-000",  # an earlier version of the same shard
                              {"m": LowRank(a=torch.ones(1, 5), b=torch.ones(4, 1))}, meta={})
    write_shard(out / ".shards" / "gone", "layer-000",  # a merge no longer in the job
                {"m": LowRank(a=torch.ones(1, 5), b=torch.ones(4, 1))}, meta={})
    leftover = out / ".shards" / "a" / ".123.456.tmp"
    leftover.write_bytes(b"a killed writer's")
    (out / "gone").mkdir()  # the merged adapter directory of a removed merge: never touched
    rows = [{"merge": "a", "shard": "layer-000", "status": "done", "path": str(kept.relative_to(out)),
             "sha256": sha}]
    removed = prune_shards(out, rows, ["a", "b"])
    assert set(removed) == {out / ".shards" / "gone", leftover, stale, older}
    assert used[0].is_file() and kept.is_file() and (out / "gone").is_dir()
    assert prune_shards(out, rows, ["a", "b"]) == []  # nothing more to do
    # a shard not finished does not keep its bases: the next run writes them again
    assert set(prune_shards(out, [{**rows[0], "status": "running"}], ["a"])) == {kept, used[0]}


@pytest.mark.parametrize("cluster, given, want", [
    ({"CPU": 16.0, "GPU": 4.0}, {}, (4, 4.0, 1.0)),  # a GPU's share of the node's CPUs each, not 1 of 16
    ({"CPU": 8.0, "GPU": 1.0}, {}, (1, 8.0, 1.0)),
    ({"CPU": 16.0, "GPU": 2.0}, {"gpus_per_worker": 0.5}, (4, 4.0, 0.5)),
    ({"CPU": 2.0, "GPU": 2.0}, {}, (2, 1.0, 1.0)),
    ({"CPU": 16.0, "GPU": 4.0}, {"cpus_per_worker": 2.0}, (4, 2.0, 1.0)),  # the job file's value wins
    ({"CPU": 8.0}, {}, (4, 2.0, 0.0)),
])
def test_gpu_workers_get_the_cpus_that_come_with_their_gpus(cluster, given, want):
    from pipeline.config import JobSpec
    from pipeline.driver import resolve_resources

    job = JobSpec(path=Path("job.yaml"), output_dir=Path("out"), merges=(), **given)
    res = resolve_resources(job, cluster)
    assert (res.workers, res.cpus_per_worker, res.gpus_per_worker) == want
