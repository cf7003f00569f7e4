"""cluster/: every YAML parses, and holds the fields that cluster/README.md relies on."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import ray
import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
README = (CLUSTER / "README.md").read_text()


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def test_runtime_env():
    env = load("runtime_env.yaml")
    assert set(env) <= {"working_dir", "excludes", "env_vars", "pip", "py_modules"}
    assert env["working_dir"] == "."
    assert {".git/", "tests/", "bench/", "*.safetensors"} <= set(env["excludes"])  # adapters are not uploaded
    assert env["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"
    assert all(isinstance(v, str) for v in env["env_vars"].values())  # Ray wants strings
    assert "--runtime-env cluster/runtime_env.yaml" in README


def test_start_head_script():
    script = (CLUSTER / "start-head.sh").read_text()
    assert subprocess.run(["bash", "-n", str(CLUSTER / "start-head.sh")]).returncode == 0
    assert "export RAY_AUTH_MODE=token" in script
    assert "--dashboard-host 127.0.0.1" in script and '--node-ip-address "$head_ip"' in script
    assert 'head_ip="${RAY_HEAD_IP:-127.0.0.1}"' in script
    assert "cluster/start-head.sh" in README and "RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265" in README


def test_start_head_settings_are_documented():
    """Every variable start-head.sh reads has a row in cluster/README.md's settings table, with the
    script's default."""
    script = (CLUSTER / "start-head.sh").read_text()
    section = README.split("\n## start-head.sh settings\n", 1)[1].split("\n## ", 1)[0]
    lines = [line.split("|") for line in section.splitlines()]
    rows = {cells[1].strip(): cells[2].strip() for cells in lines if len(cells) > 3}
    read = dict(re.findall(r"\$\{(RAY_[A-Z_]+):-([^}]*)\}", script))
    assert {"RAY_HEAD_IP", "RAY_HEAD_PORT", "RAY_DASHBOARD_PORT"} <= set(read)
    for name, default in read.items():
        row = next((cell for cell in rows if f"`{name}`" in cell), None)
        assert row is not None, f"{name} (read by start-head.sh) has no row in the README's settings table"
        if default and not default.startswith("$"):
            assert rows[row] == f"`{default}`", (name, rows[row], default)


def test_cluster_launcher_config():
    config = load("ray-cluster.yaml")
    assert config["provider"]["type"] == "local"
    assert config["provider"]["head_ip"] and config["provider"]["worker_ips"]
    assert config["max_workers"] == len(config["provider"]["worker_ips"])
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # one token on every node
    head = " ".join(config["head_start_ray_commands"])
    workers = " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in workers
    assert "--dashboard-host=127.0.0.1" in head and "--head" in head
    assert "--address=$RAY_HEAD_IP:6379" in workers
    assert "ray up cluster/ray-cluster.yaml" in README and "ray attach cluster/ray-cluster.yaml -p 8265" in README


def test_kuberay_rayjob():
    job = load("kuberay/rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python -m pipeline run ")
    assert spec["submissionMode"] == "SidecarMode"
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["rayVersion"] == ray.__version__  # the version this repository is tested with
    head = cluster["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and head["rayStartParams"]["num-gpus"] == "0"
    mounts = {m["mountPath"] for m in head["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert {"/data", "/config"} <= mounts and spec["entrypoint"].split()[-1].startswith("/config/")
    (gpu,) = cluster["workerGroupSpecs"]
    container = gpu["template"]["spec"]["containers"][0]
    assert gpu["rayStartParams"]["num-gpus"] == "1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/data"}
    assert "kubectl apply -f cluster/kuberay/rayjob.yaml" in README
