"""Never hang: actors that cannot be placed hold no work, a job that can place none ends with the
reason, and a stall is reported with what each actor does (issue 12, points 8 and 10). On the test
session's Ray: 2 CPUs, 2 fake GPUs."""

from __future__ import annotations

import pytest

import pipeline.driver
from pipeline.driver import run_job_file
from pipeline.manifest import read_manifest

from pipeline_helpers import json_lines, write_job

pytestmark = pytest.mark.usefixtures("ray_session")

JOB = """
output_dir: out
workers: {workers}
gpus_per_worker: 0
cpus_per_worker: {cpus}
max_in_flight_per_worker: 1
placement_timeout_s: {placement}
stall_timeout_s: {stall}
merges:
  - name: tsv
    adapters: [adapters/snli, adapters/mnli, adapters/rte]
    method: tsv
"""


def test_a_job_runs_on_the_actors_that_can_be_placed(tmp_path, adapters, capsys, monkeypatch):
    monkeypatch.setattr(pipeline.driver, "PARTIAL_PLACEMENT_GRACE", 0.0)
    monkeypatch.setenv("COREMERGE_TEST_SHARD_DELAY", "0.5")
    # 3 actors of 1 CPU on a 2-CPU cluster: today's cluster/README advice on a small machine
    job = write_job(tmp_path / "job.yaml", JOB.format(workers=3, cpus=1, placement=600, stall=900))
    assert run_job_file(job) == 0
    table = read_manifest(tmp_path / "out").to_pylist()
    assert {r["status"] for r in table} == {"done"} and len(table) == 3
    assert len({r["worker"] for r in table}) <= 2  # the third actor never got a shard
    events = json_lines(capsys.readouterr().out)
    [warning] = [e for e in events if e["event"] == "workers_unplaced"]
    assert warning["level"] == "warning" and warning["unplaced"] >= 1 and warning["workers"] == 3
    assert "cannot be placed now" in warning["message"] and "cpus_per_worker" in warning["message"]


def test_a_job_that_can_place_no_actor_ends_with_the_reason(tmp_path, adapters, capsys):
    job = write_job(tmp_path / "job.yaml", JOB.format(workers=1, cpus=4, placement=3, stall=900))
    assert run_job_file(job) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pipeline: error: no merge actor could be placed in 3 s: each asks for 4 CPU")
    table = read_manifest(tmp_path / "out").to_pylist()
    assert {r["status"] for r in table} == {"pending"}  # still to do: the next run on a bigger cluster does it
    assert all(r["error"].startswith("not run: no merge actor could be placed") for r in table)
    from pipeline.liveness import read_state

    state = read_state(tmp_path / "out")
    assert state["state"] == "failed" and state["exit_status"] == 1 and "could be placed" in state["reason"]


def test_a_stall_is_reported_with_what_each_actor_does(tmp_path, adapters, capsys, monkeypatch):
    monkeypatch.setenv("COREMERGE_TEST_SHARD_DELAY", "3")
    job = write_job(tmp_path / "job.yaml", JOB.format(workers=1, cpus=1, placement=600, stall=1))
    assert run_job_file(job) == 0  # slow, not stuck: it finishes
    stalls = [e for e in json_lines(capsys.readouterr().out) if e["event"] == "stall"]
    assert stalls, "no stall reported while a shard took 3 s with stall_timeout_s 1"
    actor = stalls[0]["actors"][0]
    assert actor["state"] == "working" and actor["work"].startswith("layer-00") and "tsv" in actor["work"]
    assert actor["process"].count(":") == 1 and actor["for_s"] >= 1
    assert stalls[0]["message"].startswith("no work finished for ")
