"""What the driver tells its user: a progress bar on a terminal, JSON log lines otherwise.

Under ``ray job submit`` (no terminal) every line is one JSON object on stdout, so job logs
can be grepped and parsed: ``{"event": "progress", "done": 12, "total": 64, ...}`` every
``COREMERGE_LOG_INTERVAL`` seconds (default 5), plus one line per notable event
(start, retry, merge assembled, merge failed, finished). Also the ``status`` table.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TextIO

DEFAULT_INTERVAL = 5.0


def rss_mb() -> float:
    """Peak resident memory of this process, in MiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


class Progress:
    """Counts shards; draws a bar on a TTY, else logs a JSON line at most every ``interval`` s.

    The totals may be given at once or later with :meth:`begin` (the driver knows them once it has
    read the manifest).
    """

    def __init__(self, *, merges: int, total: int | None = None, done: int = 0, stream: TextIO | None = None,
                 interval: float | None = None, tty: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        if interval is None:
            interval = float(os.environ.get("COREMERGE_LOG_INTERVAL", DEFAULT_INTERVAL))
        self.interval = interval
        self.total, self.done, self.failed, self.running = 0, 0, 0, 0
        self.merges, self.merges_done, self.merges_failed = merges, 0, 0
        self.started = time.monotonic()
        self._logged = self.started
        self._bar = None
        if total is not None:
            self.begin(total=total, done=done)

    def begin(self, *, total: int, done: int) -> None:
        """Set the totals (shards of the job, already done); on a terminal, start the bar."""
        self.total, self.done = total, done
        if self.tty and self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=done, unit="shard", desc="merging", file=sys.stderr,
                             dynamic_ncols=True)

    def event(self, event: str, **fields: object) -> None:
        """One notable event: a line above the bar (or on stderr), or one JSON log line."""
        if self.tty:
            text = " ".join(f"{k}={v}" for k, v in fields.items())
            self._write(f"{event}: {text}")
        else:
            self._emit(event, **fields)

    def warn(self, event: str, message: str, **fields: object) -> None:
        """Something the user must hear of: one line of words on a terminal, a JSON line with
        ``"level": "warning"`` and the same ``message`` otherwise."""
        if self.tty:
            self._write(f"warning: {message}")
        else:
            self._emit(event, level="warning", message=message, **fields)

    def _write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def shard_finished(self, *, failed: bool = False) -> None:
        if failed:
            self.failed += 1
        else:
            self.done += 1
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(failed=self.failed, running=self.running, refresh=False)

    def tick(self) -> None:
        """Called often; logs a progress line when ``interval`` has passed (no terminal)."""
        now = time.monotonic()
        if not self.tty and now - self._logged >= self.interval:
            self._emit("progress", **self.counts())

    def counts(self) -> dict[str, object]:
        return {"done": self.done, "total": self.total, "failed": self.failed, "running": self.running,
                "merges_done": self.merges_done, "merges_failed": self.merges_failed, "merges": self.merges,
                "elapsed_s": round(time.monotonic() - self.started, 1), "driver_max_rss_mb": rss_mb()}

    def interrupted(self, **fields: object) -> None:
        """The run was stopped (SIGINT, SIGTERM): the last line, with the counts so far."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if not self.tty:
            self._emit("interrupted", **self.counts(), **fields)

    def close(self, **summary: object) -> None:
        """The last line: counts, peak memory, and ``summary`` (failed merges, ...)."""
        if not self.tty:
            self._emit("finished", **self.counts(), **summary)
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        counts = self.counts()
        print(f"finished: {counts['done']}/{counts['total']} shards, {counts['merges_done']}/{counts['merges']} "
              f"merges written, {counts['merges_failed']} failed, {counts['elapsed_s']} s; peak RSS: driver "
              f"{counts['driver_max_rss_mb']} MB, workers {summary.get('worker_max_rss_mb')} MB", file=sys.stderr)
        for merge, error in (summary.get("errors") or {}).items():
            print(f"failed: {merge}: {error}", file=sys.stderr)

    def _emit(self, event: str, **fields: object) -> None:
        self._logged = time.monotonic()
        line = json.dumps({"ts": round(time.time(), 3), "event": event, **fields}, default=str)
        print(line, file=self.stream, flush=True)


def status_table(merges: Sequence[str], rows: Sequence[Mapping[str, object]]) -> list[str]:
    """Lines of ``python -m pipeline status``: per merge, shards done / total, failures, elapsed."""
    by_merge: dict[str, list[Mapping[str, object]]] = {m: [] for m in merges}
    for row in rows:
        by_merge.setdefault(str(row["merge"]), []).append(row)
    width = max([len("merge")] + [len(m) for m in by_merge])
    lines = [f"{'merge':<{width}}  {'shards':>9}  {'state':<8}  {'elapsed':>9}  {'work':>9}"]
    failures = []
    for merge, mrows in by_merge.items():
        done = sum(1 for r in mrows if r["status"] == "done")
        failed = [r for r in mrows if r["status"] == "failed"]
        if not mrows:
            state = "planned"
        elif failed:
            state = "failed"
        elif done == len(mrows):
            state = "done" if any(r.get("output_sha256") for r in mrows) else "merged"
        elif any(r["status"] == "running" for r in mrows):
            state = "running"
        else:
            state = "pending"
        starts = [float(r["started_at"]) for r in mrows if r.get("started_at") is not None]
        ends = [float(r["finished_at"]) for r in mrows if r.get("finished_at") is not None]
        elapsed = f"{max(ends) - min(starts):.1f} s" if starts and ends else "-"
        work = f"{sum(float(r['seconds'] or 0.0) for r in mrows):.1f} s" if ends else "-"
        total = len(mrows) if mrows else "?"
        lines.append(f"{merge:<{width}}  {f'{done}/{total}':>9}  {state:<8}  {elapsed:>9}  {work:>9}")
        failures += [f"  {merge} {r['shard']} (attempt {r['attempt']}): {r['error']}" for r in failed]
    if failures:
        lines += ["", "failed shards:", *failures]
    return lines
