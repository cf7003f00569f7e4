"""Finished work rests on what the inputs hold, and nothing is built from two versions of an input
(issue 12, points 2 and 3).

The "new version" of adapter snli is another adapter of the same shapes written over it in place:
same path, same inode, same size, and its modification time set back (what ``cp -p`` or
``rsync -t`` onto an existing file leaves). Only the content and the ctime differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from coremerge.synthetic import llama_shapes, write_lora_adapter
from pipeline.actors import MergeWorker
from pipeline.config import load_job
from pipeline.driver import run_job_file
from pipeline.plan import make_plan, work_of
from pipeline.status import status_file

from pipeline_helpers import TINY, json_lines, write_job

pytestmark = pytest.mark.usefixtures("ray_session")

WEIGHTS = "adapter_model.safetensors"
JOB = """
output_dir: {out}
workers: 1
gpus_per_worker: 0
cpus_per_worker: 1
merges:
  - name: tsv
    adapters: [{snli}, adapters/mnli]
    method: tsv
  - name: ta
    adapters: [adapters/mnli, adapters/rte]
"""


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def new_version(tmp_path: Path) -> Path:
    """Another adapter with snli's shapes, rank and alpha (so its weights file has snli's size)."""
    return write_lora_adapter(tmp_path / "snli-v2", llama_shapes(**TINY), rank=4, lora_alpha=8, seed=99)


def write_over_keeping_mtime(target: Path, source: Path) -> None:
    """``cp -p source target`` onto an existing file: same inode, same size, mtime set back."""
    before = target.stat()
    data = source.read_bytes()
    assert len(data) == before.st_size
    with open(target, "r+b") as f:
        f.write(data)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = target.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)


def reference_output(tmp_path: Path, snli: Path, name: str = "tsv") -> bytes:
    """The merged weights of a fresh job over ``snli`` (nothing cached, another output_dir)."""
    job = write_job(tmp_path / "reference.yaml", JOB.format(out="reference-out", snli=snli))
    assert run_job_file(job) == 0
    return (tmp_path / "reference-out" / name / WEIGHTS).read_bytes()


def test_an_input_rewritten_with_size_and_mtime_kept_is_merged_again(tmp_path, adapters, one_thread, capsys):
    job = write_job(tmp_path / "job.yaml", JOB.format(out="out", snli="adapters/snli"))
    assert run_job_file(job) == 0
    out = tmp_path / "out"
    untouched = (out / "ta" / WEIGHTS).read_bytes()
    capsys.readouterr()

    weights = adapters[0] / WEIGHTS
    write_over_keeping_mtime(weights, new_version(tmp_path) / WEIGHTS)
    assert run_job_file(job) == 0
    start = next(e for e in json_lines(capsys.readouterr().out) if e["event"] == "start")
    assert start["to_do"] == 3  # tsv's three layers; ta does not read snli
    report = json.loads((out / "tsv" / "merge_report.json").read_text())
    assert report["inputs"][0]["sha256"] == sha(weights)  # names the file as it is now
    assert (out / "ta" / WEIGHTS).read_bytes() == untouched
    assert (out / "tsv" / WEIGHTS).read_bytes() == reference_output(tmp_path, tmp_path / "snli-v2")


def test_a_rerun_with_unchanged_inputs_reads_no_input_again(tmp_path, adapters, capsys, monkeypatch):
    """The content hashes are cached on disk per file version: a rerun hashes nothing it hashed before."""
    from coremerge import safetensors_file

    monkeypatch.setattr(safetensors_file, "RACY_NS", 0)  # as if the adapters were older than 2 s
    job = write_job(tmp_path / "job.yaml", JOB.format(out="out", snli="adapters/snli"))
    assert run_job_file(job) == 0
    monkeypatch.setattr(safetensors_file, "_KNOWN", type(safetensors_file._KNOWN)())  # a new process
    hashed: list[int] = []
    real = safetensors_file._hash_fd
    monkeypatch.setattr(safetensors_file, "_hash_fd", lambda fd: hashed.append(fd) or real(fd))
    assert run_job_file(job) == 0
    assert hashed == []
    assert (tmp_path / "out" / "manifest" / "_hashes.json").is_file()
    import pyarrow.parquet as pq  # the driver's side files do not stop pyarrow reading the manifest directory

    assert pq.read_table(tmp_path / "out" / "manifest").num_rows == 6


def test_a_worker_refuses_inputs_that_changed_since_the_job_started(tmp_path, adapters):
    job, sources = load_job(write_job(tmp_path / "job.yaml", JOB.format(out="out", snli="adapters/snli")))
    plan = make_plan(job, sources)
    task = next(t for t in plan.tasks if "tsv" in t.merges)
    work = work_of(job, plan, task, ["tsv"])
    worker = MergeWorker(1, 0, {})
    assert worker.run(work)[0]["status"] == "done"  # the worker now holds the adapters open

    write_over_keeping_mtime(adapters[0] / WEIGHTS, new_version(tmp_path) / WEIGHTS)
    records = worker.run(work)
    assert [r["status"] for r in records] == ["failed"]
    assert "changed since the job started" in records[0]["error"] and "snli" in records[0]["error"]


def test_an_input_replaced_mid_run_fails_its_merge_and_keeps_nothing(tmp_path, adapters, capsys, monkeypatch):
    monkeypatch.setenv("COREMERGE_TEST_SHARD_DELAY", "1.5")  # each shard takes 1.5 s: time to replace a file
    job = write_job(tmp_path / "job.yaml", JOB.format(out="out", snli="adapters/snli"))
    out = tmp_path / "out"
    result: list[int] = []
    driver = threading.Thread(target=lambda: result.append(run_job_file(job)))
    driver.start()
    deadline = time.monotonic() + 120
    while not list((out / ".shards" / "tsv").glob("*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.05)
    capsys.readouterr()
    assert status_file(job) == 0  # issue 12, point 11: a live driver is said to be one
    said = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("{")]  # not the driver's
    assert re.fullmatch(r"last run: running \(heartbeat \d+ s ago\), .*", said[0]), said
    assert any(line.split()[:1] == ["tsv"] and "running" in line for line in said), said
    replacement = new_version(tmp_path) / WEIGHTS  # a new file renamed over the old one, as an editor saves
    shutil.copyfile(replacement, adapters[0] / "new.tmp")
    os.replace(adapters[0] / "new.tmp", adapters[0] / WEIGHTS)
    driver.join(timeout=300)
    assert result == [1]
    events = json_lines(capsys.readouterr().out)
    failed = [e for e in events if e["event"] == "merge_failed"]
    assert [e["merge"] for e in failed] == ["tsv"]
    assert "changed since" in failed[0]["error"] and "snli" in failed[0]["error"]
    assert not (out / "tsv").exists() and (out / "ta" / WEIGHTS).is_file()

    monkeypatch.delenv("COREMERGE_TEST_SHARD_DELAY")
    assert run_job_file(job) == 0  # the next run merges the new version whole
    assert (out / "tsv" / WEIGHTS).read_bytes() == reference_output(tmp_path, tmp_path / "snli-v2")


def test_an_input_replaced_before_planning_is_planned_as_it_is_now(tmp_path, adapters):
    """Between reading the job file and hashing the inputs (minutes, for a large batch) an adapter is
    replaced: the run plans, merges and reports the new version, whole."""
    job, sources = load_job(write_job(tmp_path / "job.yaml", JOB.format(out="out", snli="adapters/snli")))
    replacement = new_version(tmp_path) / WEIGHTS
    shutil.copyfile(replacement, adapters[0] / "new.tmp")
    os.replace(adapters[0] / "new.tmp", adapters[0] / WEIGHTS)
    plan = make_plan(job, sources)
    snli_set = job.merge("tsv").adapter_set
    assert plan.inputs[snli_set][0].weights_sha256 == sha(replacement)
    assert sources[snli_set][0].weights_version.ino == (adapters[0] / WEIGHTS).stat().st_ino  # reopened
