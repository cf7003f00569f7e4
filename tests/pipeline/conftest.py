"""Fixtures of the pipeline tests: one local Ray per session, adapters, thread count.

The session Ray has 2 CPUs and 2 *fake* GPUs (``num_gpus=2`` on a machine without CUDA): jobs
that leave gpus_per_worker unset get GPU actors, which merge on the CPU (torch sees no CUDA).
Tests that start Ray clusters of their own (SIGKILL, ray job submit) give them their own
RAY_TMPDIR and ports, mark every process with an environment variable, and stop exactly those
processes afterwards (never ``ray stop``, which stops every Ray instance on the machine).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pipeline_helpers import make_adapters

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the in-process tests (2 CPUs, 2 fake GPUs), started as the pipeline starts its
    own: loopback only, token file 0600 (pipeline.local_ray)."""
    from pipeline.local_ray import start_local_ray

    try:
        start_local_ray(num_cpus=2, num_gpus=2)
    except Exception as err:  # noqa: BLE001  Ray waits 30 s for its raylet: too short on a loaded machine
        if "timed out during startup" not in str(err):
            raise
        import ray

        ray.shutdown()
        start_local_ray(num_cpus=2, num_gpus=2)
    import ray

    yield ray
    ray.shutdown()


@pytest.fixture
def adapters(tmp_path: Path) -> list[Path]:
    return make_adapters(tmp_path / "adapters")


@pytest.fixture
def one_thread():
    """Run a reference merge with the workers' thread count (1), so that bytes can be compared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
