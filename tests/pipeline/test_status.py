"""``status`` never lies and ``plan`` starts nothing: another job file on the same output_dir does not
pass for this one, ``plan`` prints every merge and what is done without Ray, and a rerun with nothing
to do never starts Ray (issue 12, points 11 and 17)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline.driver import run_job_file
from pipeline.status import plan_file, status_file

from pipeline_helpers import json_lines, write_job

pytestmark = pytest.mark.usefixtures("ray_session")

JOB = """
output_dir: out
workers: 1
gpus_per_worker: 0
cpus_per_worker: 1
merges:
  - name: m
    adapters: [adapters/snli, adapters/mnli]
    method: ties
    alpha: {alpha}
sweeps:
  - name: s
    adapters: [adapters/snli, adapters/mnli, adapters/rte]
    method: [ta, tsv]
    alpha: [0.5, 1.0]
"""


def test_status_of_another_job_file_on_the_same_output_dir(tmp_path, adapters, capsys):
    first = write_job(tmp_path / "first.yaml", JOB.format(alpha=1.0))
    assert run_job_file(first) == 0
    other = write_job(tmp_path / "other.yaml", JOB.format(alpha=0.5))  # same names, another alpha for m
    capsys.readouterr()
    assert status_file(other) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("last run: finished at ") and "(exit 0)" in lines[0]
    assert lines[1] == f"note: the last run on {tmp_path / 'out'} was of another job file: {first}"
    table = {line.split()[0]: line.split()[1:3] for line in lines[3:8]}
    assert table["m"] == ["0/3", "planned"]  # the first job's m is not this job's m
    assert all(table[name] == ["3/3", "done"] for name in ("s-ta-a0.5", "s-ta-a1.0", "s-tsv-a0.5", "s-tsv-a1.0"))
    assert lines[-1] == "3 rows of the manifest are another job's or older inputs': not counted above"


def test_plan_prints_every_merge_and_what_is_done_without_ray(tmp_path, adapters, capsys):
    job = write_job(tmp_path / "job.yaml", JOB.format(alpha=1.0))
    code = ("import sys; from pipeline.status import plan_file; rc = plan_file(sys.argv[1]); "
            "print('ray imported' if 'ray' in sys.modules else 'no ray'); sys.exit(rc)")
    before = subprocess.run([sys.executable, "-c", code, str(job)], capture_output=True, text=True, timeout=120)
    assert before.returncode == 0, before.stderr
    lines = before.stdout.splitlines()
    assert lines[-1] == "no ray" and not (tmp_path / "out").exists()  # nothing started, nothing written
    assert lines[0] == f"job {job}: 5 merges, 15 shards, output_dir {tmp_path / 'out'}"
    rows = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in
            ("m", "s-ta-a0.5", "s-ta-a1.0", "s-tsv-a0.5", "s-tsv-a1.0")}
    assert rows["m"][1:8] == ["ties", "core", "1", "-", "float32", "0/3", "density=0.7"]
    assert rows["s-tsv-a0.5"][1:7] == ["tsv", "core", "0.5", "-", "float32", "0/3"]
    assert any("4 merge(s) of 3 adapters (bases file shared by the shard files)" in line for line in lines)
    assert any("1 merge(s) of 2 adapters (plain shard files)" in line for line in lines)
    assert any(line.startswith("to do: 15 of 15 shards; about ") for line in lines)

    assert run_job_file(job) == 0
    capsys.readouterr()
    assert plan_file(job) == 0
    after = capsys.readouterr().out.splitlines()
    assert any(line.startswith("to do: 0 of 15 shards") for line in after)
    assert sum(1 for line in after if " 3/3 " in line) == 5


def test_a_rerun_with_nothing_to_do_never_starts_ray(tmp_path, adapters, capsys):
    job = write_job(tmp_path / "job.yaml", JOB.format(alpha=1.0))
    assert run_job_file(job) == 0
    (tmp_path / "out" / "m" / "merge_report.json").unlink()  # the adapter is rewritten, in the driver
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}  # nothing listens there: joining it would fail
    again = subprocess.run([sys.executable, "-m", "pipeline", "run", str(job)], capture_output=True, text=True,
                           env=env, timeout=120)
    assert again.returncode == 0, again.stderr
    events = json_lines(again.stdout)
    assert events[0]["event"] == "start" and events[0]["to_do"] == 0
    assert [e["merge"] for e in events if e["event"] == "merge_written"] == ["m"]
    assert events[-1]["event"] == "finished" and events[-1]["merges_done"] == 5
