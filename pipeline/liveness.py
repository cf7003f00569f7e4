"""Whether a job's driver is alive: a small state file beside the manifest, and its heartbeat.

``output_dir/manifest/_driver.json`` names the last run that held the job's lock: its run id,
host, pid, job file, when it started, when it last beat (every :data:`BEAT_EVERY` seconds, from
a thread of its own, so that a driver busy hashing gigabytes still beats), and how it ended
(``finished``, ``failed``, ``interrupted``, with the exit status and a reason). The driver writes
it; ``python -m pipeline status`` reads it and tests the job's lock, so that it can tell a live
run from a dead one (:func:`judge`):

- the lock is held: ``running (heartbeat 3 s ago)``;
- the lock is free and the file says the run ended: ``finished`` / ``failed`` / ``interrupted``
  with the time;
- the lock is free but the file still says ``running``: the driver died without a word (SIGKILL,
  a lost node): ``interrupted (driver gone since 02:14)``, the time of its last heartbeat.

Example:
    >>> beat = Heartbeat(output_dir, job_path)      # doctest: +SKIP
    >>> beat.start(); ...; beat.end("finished", 0)  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from pipeline.files import atomic_write_bytes

STATE_FILE = "_driver.json"  # "_": pyarrow reading output_dir/manifest as a dataset skips it
LOCK_FILE = ".lock"
BEAT_EVERY = 5.0  # seconds between heartbeats
REMOTE_ALIVE = 6 * BEAT_EVERY  # a driver on another host is judged by its heartbeat's age alone


def state_path(output_dir: str | Path) -> Path:
    from pipeline.manifest import MANIFEST_DIR

    return Path(output_dir) / MANIFEST_DIR / STATE_FILE


def read_state(output_dir: str | Path) -> dict[str, object] | None:
    """The last run's state, or None when there is none or it cannot be read (it is only advice)."""
    try:
        state = json.loads(state_path(output_dir).read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return state if isinstance(state, dict) else None


class Heartbeat:
    """The driver's side: writes ``_driver.json`` at the start, every few seconds, and at the end.

    A failed write (a full disk) is skipped silently: the state file is advice for ``status``,
    and the manifest is what the job trusts.
    """

    def __init__(self, output_dir: str | Path, job_path: str | Path, *, every: float = BEAT_EVERY) -> None:
        self.path = state_path(output_dir)
        self.every = every
        now = time.time()
        self.state: dict[str, object] = {
            "run_id": f"{_dt.datetime.fromtimestamp(now).strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
            "host": socket.gethostname(), "pid": os.getpid(), "job": str(Path(job_path).resolve()),
            "started_at": now, "heartbeat_at": now, "state": "running",
            "ended_at": None, "exit_status": None, "reason": None,
        }
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._write()
        self._thread = threading.Thread(target=self._run, name="coremerge-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._write()

    def end(self, state: str, exit_status: int, reason: str | None = None) -> None:
        """Record how the run ended (``finished``, ``failed``, ``interrupted``) and stop beating."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.every)
        self.state.update(state=state, exit_status=exit_status, reason=reason, ended_at=time.time())
        self._write()

    def _write(self) -> None:
        with self._lock:
            if self.state["state"] == "running":
                self.state["heartbeat_at"] = time.time()
            try:
                atomic_write_bytes(self.path, json.dumps(self.state, indent=1).encode())
            except OSError:
                pass


def lock_held(output_dir: str | Path) -> bool:
    """Whether some driver holds the job's lock now (a shared lock taken and dropped at once)."""
    from pipeline.manifest import MANIFEST_DIR

    path = Path(output_dir) / MANIFEST_DIR / LOCK_FILE
    try:
        handle = open(path, "rb")
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


@dataclass(frozen=True)
class Verdict:
    """What ``status`` says of the last run: ``alive`` and one line of words."""

    alive: bool
    words: str
    state: dict[str, object] | None


def judge(output_dir: str | Path, *, now: float | None = None) -> Verdict:
    """Whether the last run's driver is alive, in words (see the module docstring)."""
    now = time.time() if now is None else now
    state = read_state(output_dir)
    held = lock_held(output_dir)
    if state is None:
        return Verdict(held, "running (no heartbeat file)" if held else "no run recorded", state)
    beat = float(state.get("heartbeat_at") or state.get("started_at") or 0.0)
    who = f"run {state.get('run_id')} on {state.get('host')}:{state.get('pid')}"
    remote = state.get("host") != socket.gethostname()
    if state.get("state") == "running" and (held or (remote and now - beat < REMOTE_ALIVE)):
        return Verdict(True, f"running (heartbeat {max(0.0, now - beat):.0f} s ago), {who}", state)
    if state.get("state") == "running":
        return Verdict(False, f"interrupted (driver gone since {_clock(beat)}), {who}", state)
    ended = float(state.get("ended_at") or beat)
    words = f"{state.get('state')} at {_clock(ended)} (exit {state.get('exit_status')}), {who}"
    if state.get("reason"):
        words += f": {state['reason']}"
    if held:  # a new run holds the lock but has not written its state yet
        return Verdict(True, "running (starting)", state)
    return Verdict(False, words, state)


def _clock(t: float) -> str:
    return _dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")
