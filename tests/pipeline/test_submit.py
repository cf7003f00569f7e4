"""A submission through ``ray job submit`` to a head started by cluster/start-head.sh on 127.0.0.1
with token authentication, as cluster/README.md tells users to do it."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from pipeline.config import load_job
from pipeline.manifest import read_manifest

from pipeline_helpers import (assert_same_adapter, free_ports, json_lines, make_adapters, reference_merge, stop_marked,
                              write_job)

REPO = Path(__file__).resolve().parents[2]


def listening(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp) that listen on ``port`` over IPv4."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(address)
    return found


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ray") is None, reason="the ray command is not installed")
def test_ray_job_submit_to_local_head(tmp_path, one_thread):
    adapters = make_adapters(tmp_path / "adapters")
    workdir = tmp_path / "wd"  # what a user's repository checkout holds: the two packages and the job file
    for package in ("pipeline", "coremerge"):
        shutil.copytree(REPO / package, workdir / package, ignore=shutil.ignore_patterns("__pycache__"))
    write_job(workdir / "job.yaml", f"""
        output_dir: {tmp_path / "out"}
        workers: 1
        gpus_per_worker: 0
        cpus_per_worker: 1
        merges:
          - name: nli-ties
            adapters: [{", ".join(map(str, adapters))}]
            method: ties
            params: {{density: 0.5}}
    """)
    gcs, dashboard, client, agent = free_ports(4)
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(32))
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    ray_tmp = tempfile.mkdtemp(prefix="cms", dir="/tmp")  # its own Ray: session files, sockets
    env.update(COREMERGE_TEST_RUN=marker, RAY_TMPDIR=ray_tmp,
               RAY_AUTH_TOKEN_PATH=str(token), RAY_HEAD_PORT=str(gcs), RAY_DASHBOARD_PORT=str(dashboard))
    address = f"http://127.0.0.1:{dashboard}"
    try:
        start = subprocess.run(["bash", str(REPO / "cluster" / "start-head.sh"), "--num-cpus", "2",
                                "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent)],
                               env=env, capture_output=True, text=True, timeout=240)
        if start.returncode != 0 and "dashboard" in (start.stdout + start.stderr).lower():
            pytest.skip(f"the Ray dashboard could not start here: {start.stderr.strip().splitlines()[-1:]}")
        assert start.returncode == 0, start.stdout + start.stderr
        assert listening(dashboard) == {"0100007F"}  # the job API: 127.0.0.1 only

        with pytest.raises(urllib.error.HTTPError) as refused:  # no token, no job API
            urllib.request.urlopen(f"{address}/api/jobs/", timeout=30)
        assert refused.value.code == 401

        submit = subprocess.run(
            ["ray", "job", "submit", "--address", address, "--working-dir", ".",
             "--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"), "--",
             "python", "-m", "pipeline", "run", "job.yaml"],
            cwd=workdir, env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=300)
        logs = submit.stdout + submit.stderr
        assert submit.returncode == 0 and "succeeded" in logs, logs
    finally:
        stop_marked(marker, grace=3)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    finished = [e for e in json_lines(submit.stdout) if e["event"] == "finished"]  # the job's log lines
    assert finished and finished[0]["done"] == finished[0]["total"] == 3
    assert set(read_manifest(tmp_path / "out").column("status").to_pylist()) == {"done"}
    job, _ = load_job(workdir / "job.yaml")
    assert_same_adapter(tmp_path / "out" / "nli-ties", reference_merge(job.merge("nli-ties"), tmp_path / "ref"))
