"""A driver stopped by SIGTERM (``ray job stop``, a Kubernetes eviction) or SIGINT (Ctrl-C) in the
middle of a job: one line, an ``interrupted`` event, the manifest saved, the local Ray it started
stopped, ``status`` says interrupted, and the same command finishes the job (issue 12, points 11
and 12)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from pipeline.manifest import read_manifest
from pipeline.status import status_file

from pipeline_helpers import json_lines, make_adapters, marked_pids, stop_marked, write_job

JOB = """
output_dir: out
workers: 1
gpus_per_worker: 0
cpus_per_worker: 1
max_in_flight_per_worker: 1
merges:
  - name: nli-tsv
    adapters: [adapters/snli, adapters/mnli, adapters/rte]
    method: tsv
"""


def done_rows(out):
    try:
        table = read_manifest(out)
    except Exception:  # noqa: BLE001  read while the driver replaces it
        return {}
    return {} if table is None else {(r["merge"], r["shard"]): r for r in table.to_pylist() if r["status"] == "done"}


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_driver_saves_says_so_and_stops_its_ray(tmp_path, signum, capsys):
    make_adapters(tmp_path / "adapters", layers=5)
    job = write_job(tmp_path / "job.yaml", JOB)
    marker = uuid.uuid4().hex
    ray_tmp = tempfile.mkdtemp(prefix="cms", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(COREMERGE_TEST_RUN=marker, RAY_TMPDIR=ray_tmp)
    command = [sys.executable, "-m", "pipeline", "run", str(job)]
    try:
        driver = subprocess.Popen(command, env={**env, "COREMERGE_TEST_SHARD_DELAY": "1"}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + 150
        while len(done_rows(tmp_path / "out")) < 1:
            assert driver.poll() is None, driver.communicate()
            assert time.monotonic() < deadline, "no shard finished in time"
            time.sleep(0.2)
        driver.send_signal(signum)  # the driver alone, as `ray job stop` signals it
        stdout, stderr = driver.communicate(timeout=30)
        expected = 143 if signum == signal.SIGTERM else 130
        assert driver.returncode == expected, stderr
        assert "Traceback" not in stderr and "*** SIGTERM received" not in stderr, stderr
        ours = [line for line in stderr.splitlines() if line.startswith("pipeline:")]
        assert len(ours) == 1 and "stopped; the manifest is saved" in ours[0]
        events = json_lines(stdout)
        assert events[-1]["event"] == "interrupted" and events[-1]["signal"] == signal.Signals(signum).name
        # the Ray it started is gone with it, without anybody's help
        deadline = time.monotonic() + 30
        while marked_pids(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert marked_pids(marker) == [], "Ray processes outlived the stopped driver"
        saved = done_rows(tmp_path / "out")
        assert 1 <= len(saved) < 5
        table = read_manifest(tmp_path / "out").to_pylist()
        assert "running" not in {r["status"] for r in table}  # what was in flight is to do again, and says why
        assert any((r["error"] or "").startswith("interrupted") for r in table if r["status"] == "pending")
        assert status_file(job) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith("last run: interrupted at ") and f"(exit {expected})" in lines[0], lines
        state = json.loads((tmp_path / "out" / "manifest" / "_driver.json").read_text())
        assert state["state"] == "interrupted" and state["exit_status"] == expected
        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
        assert again.returncode == 0, again.stderr
    finally:
        stop_marked(marker)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    after = {(r["merge"], r["shard"]): r for r in read_manifest(tmp_path / "out").to_pylist()}
    assert {r["status"] for r in after.values()} == {"done"} and len(after) == 5
    for key, row in saved.items():  # finished before the signal: never redone
        assert (after[key]["sha256"], after[key]["finished_at"]) == (row["sha256"], row["finished_at"])
