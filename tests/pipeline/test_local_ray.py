"""Where every port of the Ray this project starts listens, checked against cluster/README.md.

Each Ray test runs what users run (``python -m pipeline run`` with no RAY_ADDRESS; start-head.sh
and a ``RAY_ADDRESS=auto python -m pipeline run`` joining it; start-head.sh with RAY_HEAD_IP)
with its own RAY_TMPDIR, a temporary HOME (so ~/.ray/auth_token is the test's) and free ports.
While the job runs it reads the LISTEN sockets of that Ray's processes from /proc/net/tcp and
tcp6, names each socket's role from Ray's own records (the port files in the session directory,
the "<server> server started, listening on port N" log lines, the fixed metrics ports), and
compares them with the README's Security table: an undocumented socket, a documented one that
is missing, one on another address or in another process fails, and for start-head.sh each port
is asked without a token and must refuse or serve as the table's token column says. So the
table and Ray cannot drift apart.

A Ray process is one whose environment holds the test's marker or that has a file open under
its RAY_TMPDIR (every Ray process logs there). The marker alone misses the dashboard and
runtime env agents: setproctitle overwrites their /proc/<pid>/environ.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.local_ray import _gcs_host, ensure_token_file

from pipeline_helpers import free_ports, make_adapters, write_job

REPO = Path(__file__).resolve().parents[2]
README = REPO / "cluster" / "README.md"
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
ANY = {"0.0.0.0", "::"}

# Ray records of the ports it opened: session-directory port files and gRPC log lines.
PORT_FILES = {"gcs_server_port": "GCS", "metrics_agent_port": "dashboard agent gRPC",
              "dashboard_agent_listen_port": "dashboard agent HTTP", "metrics_export_port": "metrics export",
              "runtime_env_agent_port": "runtime env agent"}
GRPC_SERVERS = {"GcsServer": "GCS", "NodeManager": "node manager", "ObjectManager": "object manager",
                "driver": "core workers", "worker": "core workers"}

# The README's "process" column: a pattern of the command line of the process holding the port.
PROCESSES = {"gcs_server": r"/gcs_server\b", "raylet": r"/raylet\b",
             "dashboard agent": r"DashboardAgent|dashboard/agent\.py",
             "runtime env agent": r"RuntimeEnvAgent|runtime_env/agent",
             "monitor": r"autoscaler/_private/monitor\.py", "dashboard": r"dashboard/dashboard\.py",
             "ray.util.client.server": r"ray\.util\.client\.server", "drivers, workers, actors": r"python|ray::"}
# How to ask each port something without a token: gRPC methods that only read, HTTP paths.
ASK = {"GCS": ("grpc", "/ray.rpc.NodeInfoGcsService/GetAllNodeInfo"),
       "node manager": ("grpc", "/ray.rpc.NodeManagerService/GetNodeStats"),
       "object manager": ("grpc", "/ray.rpc.ObjectManagerService/Pull"),
       "core workers": ("grpc", "/ray.rpc.CoreWorkerService/GetCoreWorkerStats"),
       "dashboard agent gRPC": ("grpc", "/ray.rpc.ReporterService/HealthCheck"),
       "Ray client server": ("grpc", "/ray.rpc.RayletDriver/ClusterInfo"),
       "dashboard agent HTTP": ("http", "/"), "runtime env agent": ("http", "/"),
       "dashboard and job API": ("http", "/api/jobs/"), "metrics export": ("http", "/metrics"),
       "autoscaler metrics": ("http", "/metrics"), "dashboard metrics": ("http", "/metrics")}
HEALTH_CHECK = "/api/local_raylet_healthz"  # the dashboard agent's, served without a token

JOB = """
output_dir: out
workers: 1
gpus_per_worker: 0
cpus_per_worker: 1
max_in_flight_per_worker: 1
merges:
  - name: nli-ties
    adapters: [adapters/snli, adapters/mnli, adapters/rte]
    method: ties
"""
SHARDS, SHARD_DELAY = 4, "2"  # 8 s to find the merge actor at work (and pause it: see actor_paused)

CHILD = """
import os, sys, pathlib, ray
ray.init()  # RAY_ADDRESS
@ray.remote
def pid():
    return os.getpid()
ray.get(pid.remote())  # a worker's core worker listens too
pathlib.Path(sys.argv[2]).touch()
sys.stdin.readline()
ray.shutdown()
"""


@dataclass(frozen=True)
class Listener:
    ip: str
    port: int
    pid: int


@dataclass
class RayRun:
    """One Ray of a test: its marker, RAY_TMPDIR, environment and the fixed ports it may hold."""
    marker: str
    tmpdir: Path
    env: dict[str, str]
    extra_roles: dict[int, str]

    @property
    def session(self) -> Path:
        return self.tmpdir / "ray" / "session_latest"


@pytest.fixture
def ray_run(tmp_path):
    """A fresh environment for one Ray; stops exactly its processes afterwards."""
    home = tmp_path / "home"
    home.mkdir()
    tmpdir = Path(tempfile.mkdtemp(prefix="cml", dir="/tmp"))  # short: Ray's socket paths live there
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_TMPDIR=str(tmpdir), COREMERGE_TEST_RUN=marker, RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=str(REPO))
    run = RayRun(marker, tmpdir, env, {})
    try:
        yield run
    finally:
        stop(run)
        shutil.rmtree(tmpdir, ignore_errors=True)


def ray_pids(run: RayRun) -> set[int]:
    needle, root = f"COREMERGE_TEST_RUN={run.marker}".encode(), str(run.tmpdir)
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0") or any(
                    os.readlink(fd).startswith(root + "/") for fd in (entry / "fd").iterdir()):
                pids.add(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return pids


def stop(run: RayRun) -> None:
    """SIGTERM, then SIGKILL, every process of this test's Ray (never `ray stop`)."""
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):  # raylet and GCS take ~10 s on SIGTERM
        for pid in ray_pids(run):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while ray_pids(run) and time.monotonic() < deadline:
            time.sleep(0.2)


def listen_sockets() -> dict[str, tuple[str, int]]:
    """inode -> (address, port) of every TCP socket in LISTEN state on this machine."""
    found = {}
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)  # little-endian 32-bit words
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found[fields[9]] = (socket.inet_ntop(family, raw), int(port, 16))
    return found


def ray_listeners(run: RayRun) -> list[Listener]:
    sockets, found = listen_sockets(), []
    for pid in ray_pids(run):
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        found += [Listener(*sockets[link[8:-1]], pid) for link in links
                  if link.startswith("socket:[") and link[8:-1] in sockets]
    return found


def port_roles(run: RayRun) -> dict[int, str]:
    """Port -> role (a row of the README's table), from what this Ray recorded."""
    from ray._private.ray_constants import DEFAULT_DASHBOARD_AGENT_LISTEN_PORT
    from ray.autoscaler._private.constants import AUTOSCALER_METRIC_PORT
    from ray.dashboard.consts import DASHBOARD_METRIC_PORT

    # the fixed ports (the agent's port file says -1 when another Ray holds its port), then the rest
    roles = {AUTOSCALER_METRIC_PORT: "autoscaler metrics", DASHBOARD_METRIC_PORT: "dashboard metrics",
             DEFAULT_DASHBOARD_AGENT_LISTEN_PORT: "dashboard agent HTTP", **run.extra_roles}
    for path in run.session.glob("*_port_*"):
        name = path.name.rsplit("_", 1)[0]
        if name in PORT_FILES and path.read_text().strip().isdigit():
            roles[int(path.read_text())] = PORT_FILES[name]
    for log in (run.session / "logs").glob("*.*"):
        text = log.read_text(errors="replace")
        for server, port in re.findall(r"(\w+) server started, listening on port (\d+)", text):
            roles[int(port)] = GRPC_SERVERS.get(server, f"unknown gRPC server {server}")
    return roles


def table(column: str) -> dict[str, str]:
    """Role (the first column) -> its cell in ``column`` of the README's Security table."""
    section = README.read_text().split("\n## Security\n", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip().replace("`", "") for cell in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("|")]
    header, rows = rows[0], [r for r in rows[1:] if not set(r[0]) <= {"-"}]
    index = header.index(column)
    return {row[0]: row[index] for row in rows}


def documented(column: str) -> dict[str, set[str]]:
    """Role -> the addresses the README's Security table gives in ``column`` (empty: not started)."""
    return {role: set() if cell == "not started" else set(cell.split(" and ")) for role, cell in table(column).items()}


def where(ip: str, head_ip: str | None) -> str:
    """An address as the README's table names it."""
    if head_ip and ip in (head_ip, f"::ffff:{head_ip}"):
        return "RAY_HEAD_IP"
    return "127.0.0.1" if ip in LOOPBACK else "all interfaces" if ip in ANY else ip


def held_by_others(port: int, run: RayRun) -> bool:
    """Whether another program (say another Ray on this machine) listens on ``port``."""
    ours = {(l.ip, l.port) for l in ray_listeners(run)}
    return any(p == port and (ip, p) not in ours for ip, p in listen_sockets().values())


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def check_against_readme(run: RayRun, column: str, job: subprocess.Popen, *, head_ip: str | None = None,
                         timeout: float = 90) -> dict[str, set[Listener]]:
    """While ``job`` runs, wait until every socket of this Ray has a role and every documented port
    is open; compare addresses and processes with the README. Returns role -> its sockets."""
    doc, processes = documented(column), table("process")
    deadline = time.monotonic() + timeout
    while True:
        listeners, roles = ray_listeners(run), port_roles(run)
        unknown = [l for l in listeners if l.port not in roles]
        seen: dict[str, set[str]] = {}
        sockets: dict[str, set[Listener]] = {}
        for l in listeners:
            if l.port in roles:
                seen.setdefault(roles[l.port], set()).add(where(l.ip, head_ip))
                sockets.setdefault(roles[l.port], set()).add(l)
        # a fixed port (metrics, agent HTTP) another Ray holds stays closed here: Ray logs it, runs on
        fixed = {role: port for port, role in roles.items()}
        missing = {role for role, where_ in doc.items() if where_ and role not in seen
                   and not (role in fixed and held_by_others(fixed[role], run))}
        if (not unknown and not missing) or job.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not unknown, f"sockets the README's Security table has no row for: {unknown} (roles known: {roles})"
    assert not missing, (f"documented as listening but not open while the job ran "
                         f"(exit status {job.poll()}, None: still running): {sorted(missing)}")
    assert set(seen) <= set(doc), f"roles missing from the README table: {set(seen) - set(doc)}"
    wrong = {role: (addresses, doc[role]) for role, addresses in seen.items() if addresses != doc[role]}
    assert not wrong, f"{column}: role: (where it listens, where the README says): {wrong}"
    other = {(l.port, roles[l.port], command_line(l.pid)[:120]) for l in listeners if l.port in roles
             and not re.search(PROCESSES[processes[roles[l.port]]], command_line(l.pid))}
    assert not other, f"ports held by another process than the README's process column says: {other}"
    return sockets


def answers_without_token(kind: str, port: int, target: str, *, absent_ok: bool = False) -> bool:
    """Whether the server on 127.0.0.1:``port`` answers ``target`` to a client with no token."""
    if kind == "http":
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{target}", timeout=30).read()
        except urllib.error.HTTPError as err:
            if err.code == 401 or (absent_ok and err.code == 404):
                return False
            raise
        return True
    import grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        channel.unary_unary(target, request_serializer=bytes, response_deserializer=bytes)(b"", timeout=30)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.UNAUTHENTICATED:
            return False
        raise
    finally:
        channel.close()
    return True


def check_tokens(sockets: dict[str, set[Listener]], *, paused: int) -> None:
    """Each port refuses or serves a client without a token, as the README's token column says
    (but the ports of the process ``paused``, which answers nothing)."""
    said, wrong = table("token"), {}
    for role, listeners in sockets.items():
        kind, target = ASK[role]
        for port in {l.port for l in listeners if l.pid != paused}:
            got = "no" if answers_without_token(kind, port, target) else "yes"
            if got == "yes" and kind == "http" and answers_without_token(kind, port, HEALTH_CHECK, absent_ok=True):
                got = "yes, but its health checks"
            if got != said[role]:
                wrong[role] = (port, got, said[role])
    assert not wrong, f"role: (port, token needed, what the README says): {wrong}"


def start_job(run: RayRun, tmp_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """``python -m pipeline run job.yaml`` as a user runs it, slowed down so that it can be looked at."""
    make_adapters(tmp_path / "adapters", layers=SHARDS)
    job = write_job(tmp_path / "job.yaml", JOB)
    log = open(tmp_path / "job.log", "w")
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(job)], cwd=REPO,
                            env={**env, "COREMERGE_TEST_SHARD_DELAY": SHARD_DELAY},
                            stdout=log, stderr=subprocess.STDOUT, text=True)


def finish_job(job: subprocess.Popen, tmp_path: Path) -> None:
    """The job ends as a user's does: exit 0, its merge written."""
    status = job.wait(timeout=300)
    assert status == 0, (tmp_path / "job.log").read_text()
    assert (tmp_path / "out" / "nli-ties" / "adapter_model.safetensors").is_file()


@contextlib.contextmanager
def actor_paused(run: RayRun, job: subprocess.Popen) -> Iterator[int]:
    """Once the job's merge actor is at work, stop it (SIGSTOP) until the block ends: the job, and so
    every Ray process and socket, stays up however slowly the machine looks at them. Yields its pid."""
    deadline = time.monotonic() + 180
    while not (actors := [pid for pid in ray_pids(run) if "MergeWorker" in command_line(pid)]):
        assert job.poll() is None and time.monotonic() < deadline, "the job's merge actor never started"
        time.sleep(0.2)
    os.kill(actors[0], signal.SIGSTOP)
    try:
        yield actors[0]
    finally:
        os.kill(actors[0], signal.SIGCONT)


def start_child(run: RayRun, tmp_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """A Python process that joins Ray, runs a task and waits for a line on stdin."""
    ready, log = tmp_path / "ready", open(tmp_path / "child.log", "w")
    child = subprocess.Popen([sys.executable, "-c", CHILD, "join", str(ready)], cwd=REPO, env=env,
                             stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while not ready.exists():
        assert child.poll() is None and time.monotonic() < deadline, (tmp_path / "child.log").read_text()
        time.sleep(0.2)
    return child


def token_mode(path: Path) -> str:
    return oct(path.stat().st_mode & 0o777)


@pytest.mark.slow
def test_pipeline_run_listens_on_loopback_only_and_token_is_0600(ray_run, tmp_path):
    """`python -m pipeline run` without RAY_ADDRESS (the local Ray pipeline.local_ray starts, as
    `coremerge demo` does): while it runs, every socket of that Ray is on 127.0.0.1 as the table's
    "local Ray" column says, and the token file it created is 0600; at the end the Ray is gone."""
    token = Path(ray_run.env["HOME"]) / ".ray" / "auth_token"
    job = start_job(ray_run, tmp_path, ray_run.env)
    try:
        with actor_paused(ray_run, job):
            seen = check_against_readme(ray_run, "local Ray", job)
        assert token_mode(token) == "0o600" and re.fullmatch(r"[0-9a-f]{64}", token.read_text())
        assert {"GCS", "node manager", "object manager", "core workers", "metrics export"} <= set(seen)
        assert len(seen["core workers"]) >= 2  # the driver's and the merge actor's
    finally:
        finish_job(job, tmp_path)
    deadline = time.monotonic() + 30  # the driver stops the Ray it started
    while ray_pids(ray_run) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_pids(ray_run), [command_line(pid)[:120] for pid in ray_pids(ray_run)]


def start_head(run: RayRun, *, head_ip: str | None = None) -> tuple[int, int]:
    """cluster/start-head.sh on free ports; returns (GCS port, dashboard port)."""
    if shutil.which("ray") is None:
        pytest.skip("the ray command is not installed")
    gcs, dashboard, client, agent = free_ports(4)
    run.extra_roles.update({dashboard: "dashboard and job API", client: "Ray client server"})
    env = {**run.env, "RAY_HEAD_PORT": str(gcs), "RAY_DASHBOARD_PORT": str(dashboard)}
    if head_ip:
        env["RAY_HEAD_IP"] = head_ip
    start = subprocess.run(["bash", str(REPO / "cluster" / "start-head.sh"), "--num-cpus", "1",
                            "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent)],
                           env=env, capture_output=True, text=True, timeout=240)
    assert start.returncode == 0, start.stdout + start.stderr
    return gcs, dashboard


@pytest.mark.slow
def test_start_head_listens_on_loopback_only_and_tightens_token(ray_run, tmp_path):
    """start-head.sh as it comes, and a job that joins it with RAY_ADDRESS=auto (as cluster/README.md
    says for a Ray on this machine): every socket on 127.0.0.1; each port asks for the token as the
    table says; a 0644 ~/.ray/auth_token becomes 0600."""
    token = Path(ray_run.env["HOME"]) / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("f" * 64)
    token.chmod(0o644)  # what a plain ray.init() of Ray 2.60 leaves
    start_head(ray_run)
    assert token_mode(token) == "0o600" and token.read_text() == "f" * 64
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER unset: the driver finds the head on 127.0.0.1 itself (join_ray)
    job = start_job(ray_run, tmp_path, {**ray_run.env, "RAY_ADDRESS": "auto", "RAY_AUTH_MODE": "token"})
    try:
        with actor_paused(ray_run, job) as actor:
            seen = check_against_readme(ray_run, "start-head.sh", job)
            check_tokens(seen, paused=actor)
    finally:
        finish_job(job, tmp_path)
    assert {"GCS", "core workers", "dashboard and job API", "Ray client server"} <= set(seen)
    assert len(seen["core workers"]) >= 2  # the driver's and the merge actor's


@pytest.mark.slow
def test_start_head_with_head_ip_binds_as_documented(ray_run, tmp_path):
    """start-head.sh with RAY_HEAD_IP (worker nodes may join): the table's last address column;
    the missing token file is created 0600.

    127.0.0.2 stands for a private address: Ray treats it as one (it is not "localhost"), and
    the sockets it binds to that address stay on this machine.
    """
    gcs, _ = start_head(ray_run, head_ip="127.0.0.2")
    assert token_mode(Path(ray_run.env["HOME"]) / ".ray" / "auth_token") == "0o600"
    driver = start_child(ray_run, tmp_path, {**ray_run.env, "RAY_ADDRESS": f"127.0.0.2:{gcs}",
                                             "RAY_AUTH_MODE": "token"})
    try:
        seen = check_against_readme(ray_run, "start-head.sh with RAY_HEAD_IP", driver, head_ip="127.0.0.2")
    finally:
        driver.communicate("\n", timeout=60)
    assert {"GCS", "core workers", "dashboard and job API", "Ray client server"} <= set(seen)


# ---------------------------------------------------------------- without starting Ray


def test_ray_imported_first_still_takes_loopback(tmp_path):
    """Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, at import: setting it later changes nothing,
    so pipeline.local_ray also sets the constant Ray read, and the node IP is then 127.0.0.1."""
    code = """
import os, ray
from ray._private import ray_constants
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
assert ray_constants.ENABLE_RAY_CLUSTER, "Ray no longer reads the variable only at import"
from pipeline.local_ray import _use_loopback_node_ip
_use_loopback_node_ip()
print(ray.util.get_node_ip_address())
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["127.0.0.1"], out.stdout + out.stderr


@pytest.mark.parametrize("address, host", [("127.0.0.1:6379", "127.0.0.1"), ("localhost:6379", "localhost"),
                                           ("[::1]:6379", "::1"), ("10.0.0.5:6379", "10.0.0.5"),
                                           ("ray://127.0.0.1:10001", None)])
def test_gcs_host(address, host):
    assert _gcs_host(address) == host


def test_gcs_host_auto_is_the_head_ray_start_recorded(tmp_path, monkeypatch):
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:4242\n")  # what `ray start` writes
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # Ray's "auto" prefers the only GCS process running on this machine, if any: say there is none
    monkeypatch.setattr("ray._private.services.find_gcs_addresses", lambda: [])
    assert _gcs_host("auto") == "127.0.0.1"


@pytest.fixture
def home(tmp_path, monkeypatch):
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("before", [None, "", " \n"])
def test_a_missing_or_blank_token_file_is_written_0600(home, before):
    token = home / ".ray" / "auth_token"
    if before is not None:
        token.parent.mkdir()
        token.write_text(before)
        token.chmod(0o644)
    assert ensure_token_file() == token
    assert token_mode(token) == "0o600" and re.fullmatch(r"[0-9a-f]{64}", token.read_text())
    assert [p.name for p in token.parent.iterdir()] == ["auth_token"]  # no temp file left
    if before is None:
        assert token_mode(token.parent) == "0o700"


def test_a_token_others_can_read_is_set_to_0600_with_a_warning(home, caplog):
    token = home / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("a" * 64)
    token.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        ensure_token_file()
        ensure_token_file()
    assert token_mode(token) == "0o600" and token.read_text() == "a" * 64
    assert len(caplog.records) == 1 and "0644" in caplog.text


def test_a_token_file_named_by_ray_auth_token_path_keeps_its_mode(home, monkeypatch, caplog):
    shared = home / "shared-token"
    shared.write_text("b" * 64)
    shared.chmod(0o640)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(shared))
    with caplog.at_level(logging.WARNING):
        assert ensure_token_file() == shared
    assert token_mode(shared) == "0o640" and "RAY_AUTH_TOKEN_PATH" in caplog.text
    assert not (home / ".ray").exists()


@pytest.mark.parametrize("variable, value", [("RAY_AUTH_TOKEN", "c" * 64), ("RAY_AUTH_MODE", "disabled")])
def test_no_token_file_when_ray_reads_none(home, monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    assert ensure_token_file() is None
    assert not (home / ".ray").exists()


def test_a_ray_address_where_nothing_listens_ends_the_job_in_one_line(tmp_path):
    """ray.init retries an unreachable GCS for ever; the driver gives up after JOIN_TIMEOUT_S (1 s here)."""
    make_adapters(tmp_path / "adapters", layers=1)
    job = write_job(tmp_path / "job.yaml", """
        output_dir: out
        merges:
          - {name: ta, adapters: [adapters/snli, adapters/mnli]}
    """)
    (port,) = free_ports(1)
    script = ("import sys, pipeline.local_ray as l; l.JOIN_TIMEOUT_S = 1.0\n"
              "from pipeline.driver import run_job_file; sys.exit(run_job_file(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-c", script, str(job)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pipeline: error:")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert errors == [f"pipeline: error: cannot join the Ray cluster at 127.0.0.1:{port}: nothing answers at "
                      f"RAY_ADDRESS=127.0.0.1:{port} (Connection refused) after 1 s; is the Ray head running?"]
