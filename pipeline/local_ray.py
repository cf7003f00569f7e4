"""The Ray this project starts or joins: loopback only on one machine, token file 0600.

``python -m pipeline run`` and ``coremerge demo`` start a Ray of their own when ``RAY_ADDRESS``
is unset. A plain ``ray.init(address="local")`` of Ray 2.60 serves on every interface (GCS,
raylet, core workers, the dashboard agent's gRPC port) or on this machine's outward address
(runtime env agent, the agent's HTTP port), with three unauthenticated Prometheus endpoints on
0.0.0.0, and writes ``~/.ray/auth_token`` with the process umask (0644).

Ray binds everything to 127.0.0.1 only when its *node IP* is 127.0.0.1 (its gRPC servers listen
on loopback exactly then; the Python agents and metrics servers ask ``is_localhost``). Asking for
that address is not enough: Ray rewrites a loopback address to the machine's outward one, unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the single-node mode that is Ray's default on macOS and
Windows. :func:`start_local_ray` sets it, creates the token file 0600 before Ray would create it
0644, and otherwise starts Ray as the driver always did. A head on this machine's loopback
(``cluster/start-head.sh`` as it comes) runs in that mode too, and whoever joins its GCS must as
well (else it looks for the GCS on the outward address and times out): :func:`join_ray` does.
cluster/README.md ("Security") lists every port and where it binds;
tests/pipeline/test_local_ray.py checks that table against runs.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import stat
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

# Read by ray._private.ray_constants once, at import: "0" makes the node IP 127.0.0.1.
SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
JOIN_TIMEOUT_S = 60.0  # how long a driver waits for the GCS that RAY_ADDRESS names (a head still starting)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")  # what Ray's is_localhost accepts


def start_local_ray(*, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Start a new local Ray for this process that listens on 127.0.0.1 only.

    Every port of this Ray binds to loopback (cluster/README.md, "Security"); token
    authentication is on unless ``RAY_AUTH_MODE`` says otherwise, with the token file 0600
    (see :func:`ensure_token_file`); no dashboard; usage stats off. ``num_cpus``/``num_gpus``
    None: Ray counts them. Works whether or not ``ray`` was imported before. Stop it with
    ``ray.shutdown()``.

    Raises:
        RuntimeError: Ray would not use 127.0.0.1 as this node's address (nothing started).

    Example:
        >>> start_local_ray(num_cpus=os.cpu_count())  # doctest: +SKIP
        >>> import ray; ray.util.get_node_ip_address()  # doctest: +SKIP
        '127.0.0.1'
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if "ray" not in sys.modules:  # Ray reads it at import: set later, its driver would use no token
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # Ray's default for a new local Ray, without its warning
    _use_loopback_node_ip()
    ensure_token_file()
    import ray

    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
             logging_level=logging.WARNING)


def join_ray() -> None:
    """Join the cluster that ``RAY_ADDRESS`` names, as ``ray.init()`` does.

    When that GCS is on this machine's loopback (``127.0.0.1:6379``, ``localhost:6379``, or
    ``auto`` finding the head ``cluster/start-head.sh`` started as it comes), this process takes
    127.0.0.1 as its node IP first, as the head did; otherwise Ray would look for the GCS and
    the raylet on the machine's outward address and time out.

    Example:
        >>> os.environ["RAY_ADDRESS"] = "auto"  # doctest: +SKIP
        >>> join_ray()  # doctest: +SKIP
    """
    address = os.environ.get("RAY_ADDRESS", "auto")
    host = _gcs_host(address)
    if host in LOOPBACK_HOSTS:
        _use_loopback_node_ip()
    _check_reachable(address)
    import ray

    ray.init(logging_level=logging.WARNING)


def _check_reachable(address: str, *, within: float | None = None) -> None:
    """ConnectionError unless something accepts TCP connections at ``address`` (``host:port``) within
    ``within`` seconds: ray.init retries an unreachable GCS for ever, and an unattended job must end
    instead (other forms, ``auto`` and ``ray://``, are left to ray.init)."""
    if address == "auto" or "://" in address or ":" not in address:
        return
    host, port = address.rsplit(":", 1)
    if not port.isdigit():
        return
    within = JOIN_TIMEOUT_S if within is None else within
    deadline = time.monotonic() + within
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
            return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise ConnectionError(f"nothing answers at RAY_ADDRESS={address} ({err.strerror or err}) after "
                                      f"{within:g} s; is the Ray head running?") from None
            time.sleep(1.0)


def _gcs_host(address: str) -> str | None:
    """The host of the GCS ``address`` names (``auto``: the one Ray would pick), None if unknown."""
    if address == "auto":
        from ray._private.services import get_ray_address_from_environment

        try:  # RAY_ADDRESS=auto: the address `ray start` recorded, else a GCS process found by ps
            address = get_ray_address_from_environment("auto", None)
        except ConnectionError:  # none: ray.init() says so in its own words
            return None
    if not address or "://" in address:  # ray://, the Ray client: it has no node IP of its own
        return None
    return address.rsplit(":", 1)[0].strip("[]")


def _use_loopback_node_ip() -> None:
    """Make Ray take 127.0.0.1 as this node's address, and check that it does."""
    # In os.environ, so that the raylet, agents and workers inherit it (they get the node IP
    # on their command lines too; the variable keeps any of them from resolving another).
    os.environ[SINGLE_NODE_ENV] = "0"
    import ray
    from ray._private import ray_constants

    # Ray read the variable when it was first imported: maybe before this function set it.
    ray_constants.ENABLE_RAY_CLUSTER = False  # what "0" gives at import; services.py reads it there
    node_ip = ray.util.get_node_ip_address()
    if node_ip not in ("127.0.0.1", "::1"):  # a Ray that no longer honours the setting
        raise RuntimeError(
            f"Ray {ray.__version__} takes {node_ip}, not 127.0.0.1, as this node's address even with "
            f"{SINGLE_NODE_ENV}=0: a local Ray would listen beyond loopback; nothing started "
            "(cluster/README.md, \"Security\")")


def ensure_token_file() -> Path | None:
    """Create or tighten the token file Ray is about to read; its path, or None if none is used.

    Ray reads the token from ``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH``, else
    ``~/.ray/auth_token``, and a local ``ray.init()`` turns token mode on when ``RAY_AUTH_MODE``
    is unset. When Ray will want a file: a missing or blank one is created 0600 with 256 random
    bits, as Ray would (``secrets.token_hex(32)``), but never readable by others for an instant.
    A ``~/.ray/auth_token`` that others can read (Ray 2.60 made it 0644) is set to 0600 with one
    warning: it is this user's own file, and the token lets anyone run code as this user. A
    file named by ``RAY_AUTH_TOKEN_PATH`` keeps its mode (a shared one may be so on purpose)
    and gets the warning only.

    Example:
        >>> ensure_token_file()  # doctest: +SKIP
        PosixPath('/home/me/.ray/auth_token')
    """
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":  # token auth turned off by the user
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):  # Ray reads no file then
        return None
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(named).expanduser() if named else Path.home() / ".ray" / "auth_token"
    if _holds_token(path):
        _check_mode(path, fix=not named)
    else:
        _write_token(path)
    return path


def _holds_token(path: Path) -> bool:
    """Whether Ray would take a token from ``path`` (it ignores a blank file)."""
    try:
        return bool(path.read_text().strip())
    except FileNotFoundError:
        return False


def _check_mode(path: Path, *, fix: bool) -> None:
    """Warn, once, about a token file that others can read; set it to 0600 if ``fix``."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if not mode & 0o077:
        return
    if fix:
        try:
            path.chmod(0o600)
        except OSError as err:  # not ours: say so, and go on as Ray would
            log.warning("Ray token file %s is readable by others (mode %04o) and could not be set to 0600: %s",
                        path, mode, err)
        else:
            log.warning("Ray token file %s was readable by others (mode %04o); set it to 0600", path, mode)
    else:
        log.warning("Ray token file %s (RAY_AUTH_TOKEN_PATH) is readable by others (mode %04o); "
                    "chmod 600 it unless others must share this token", path, mode)


def _write_token(path: Path) -> None:
    """Write a new token to ``path``, mode 0600 from the start; keep one a racing writer made."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # created 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # never replaces a token another process wrote meanwhile
        except FileExistsError:
            if _holds_token(path):
                return
            os.replace(tmp, path)  # a blank file: Ray would ignore it
    finally:
        Path(tmp).unlink(missing_ok=True)
    log.info("wrote a new Ray auth token to %s (mode 0600)", path)
