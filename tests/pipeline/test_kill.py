"""The driver killed with SIGKILL mid-job, together with the local Ray it started (one process
group), then the same command again: the job finishes, finished shards are not redone, and the
adapter equals an uninterrupted run's."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from pipeline.driver import run_job_file
from pipeline.status import status_file
from pipeline.manifest import read_manifest

from pipeline_helpers import assert_same_adapter, make_adapters, marked_pids, stop_marked, write_job

JOB = """
output_dir: {out}
workers: 1
gpus_per_worker: 0
cpus_per_worker: 1
max_in_flight_per_worker: 1
merges:
  - name: nli-tsv
    adapters: [adapters/snli, adapters/mnli, {{path: adapters/rte, weight: 0.5}}]
    method: tsv
    alpha: 0.9
"""


def done_rows(output_dir):
    try:
        table = read_manifest(output_dir)
    except OSError:
        return {}
    if table is None:
        return {}
    return {(r["merge"], r["shard"]): r for r in table.to_pylist() if r["status"] == "done"}


@pytest.mark.slow
def test_sigkill_then_resume(tmp_path, ray_session, capsys):
    make_adapters(tmp_path / "adapters", layers=6)
    job = write_job(tmp_path / "job.yaml", JOB.format(out="out"))
    marker = uuid.uuid4().hex
    ray_tmp = tempfile.mkdtemp(prefix="cmk", dir="/tmp")  # its own Ray: session files, sockets, ports
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(COREMERGE_TEST_RUN=marker, RAY_TMPDIR=ray_tmp, COREMERGE_LOG_INTERVAL="1")
    command = [sys.executable, "-m", "pipeline", "run", str(job)]
    try:
        with open(tmp_path / "first.log", "w") as log:
            driver = subprocess.Popen(command, env={**env, "COREMERGE_TEST_SHARD_DELAY": "1"}, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + 150
            while len(done_rows(tmp_path / "out")) < 2:
                assert driver.poll() is None, (tmp_path / "first.log").read_text()
                assert time.monotonic() < deadline, "no shard finished in time"
                time.sleep(0.2)
            os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started
            driver.wait(timeout=30)
        before = done_rows(tmp_path / "out")
        assert 2 <= len(before) < 6
        # what the kill left: worker processes outside the group exit once their raylet is gone
        deadline = time.monotonic() + 20
        while marked_pids(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert stop_marked(marker, grace=5) == [], "Ray processes outlived the killed driver"
        assert not (tmp_path / "out" / "nli-tsv").exists()
        assert status_file(job) == 0  # the killed run: its driver is gone, its merge was interrupted
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith("last run: interrupted (driver gone since "), lines
        line = lines[2].split()
        assert line[:3] == ["nli-tsv", f"{len(before)}/6", "interrupted"], lines

        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
        assert again.returncode == 0, again.stdout + again.stderr
    finally:
        stop_marked(marker)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    after = {(r["merge"], r["shard"]): r for r in read_manifest(tmp_path / "out").to_pylist()}
    assert {r["status"] for r in after.values()} == {"done"} and len(after) == 6
    for key, row in before.items():  # finished before the kill: never redone
        assert after[key]["attempt"] == 1
        assert (after[key]["sha256"], after[key]["finished_at"]) == (row["sha256"], row["finished_at"])
    # an uninterrupted run of the same job (on the test session's Ray) writes the same adapter
    write_job(tmp_path / "job.yaml", JOB.format(out="uninterrupted"))
    assert run_job_file(job) == 0
    assert_same_adapter(tmp_path / "out" / "nli-tsv", tmp_path / "uninterrupted" / "nli-tsv")
