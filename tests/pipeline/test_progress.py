"""What the driver prints: JSON log lines without a terminal, a bar with one; the status table."""

from __future__ import annotations

import io
import json

from pipeline.progress import Progress
from pipeline.status import status_table


def test_json_lines_every_interval_without_a_terminal():
    out = io.StringIO()
    progress = Progress(total=4, done=1, merges=2, stream=out, interval=3600.0)
    progress.event("start", shards=4)
    progress.shard_finished()
    progress.tick()  # the interval has not passed: nothing
    progress.interval = 0.0
    progress.tick()
    progress.close(failed_merges=[])
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["start", "progress", "finished"]
    assert lines[1]["done"] == 2 and lines[1]["total"] == 4 and lines[1]["driver_max_rss_mb"] > 0
    assert lines[2]["failed_merges"] == []


def test_bar_on_a_terminal(capsys):
    out = io.StringIO()
    progress = Progress(total=3, done=0, merges=1, stream=out, tty=True)
    progress.shard_finished()
    progress.event("merge_written", merge="m")
    progress.close(worker_max_rss_mb=300.0)
    assert out.getvalue() == ""  # nothing for log parsers on a terminal
    err = capsys.readouterr().err
    assert "merge_written: merge=m" in err and "finished: 1/3 shards" in err and "shard" in err


def test_status_table():
    rows = [
        {"merge": "a", "shard": "layer-000", "status": "done", "attempt": 1, "seconds": 1.0, "error": None,
         "started_at": 100.0, "finished_at": 103.0, "output_sha256": "x"},
        {"merge": "a", "shard": "layer-001", "status": "done", "attempt": 2, "seconds": 1.5, "error": None,
         "started_at": 101.0, "finished_at": 104.5, "output_sha256": "x"},
        {"merge": "b", "shard": "layer-000", "status": "failed", "attempt": 1, "seconds": 0.1,
         "error": "module q: NaN", "started_at": 100.0, "finished_at": 100.5, "output_sha256": None},
        {"merge": "b", "shard": "layer-001", "status": "skipped", "attempt": 0, "seconds": None,
         "error": "not run", "started_at": None, "finished_at": None, "output_sha256": None},
    ]
    lines = status_table(["a", "b", "c"], rows)
    assert lines[1].split() == ["a", "2/2", "done", "4.5", "s", "2.5", "s"]
    assert lines[2].split()[:3] == ["b", "0/2", "failed"]
    assert lines[3].split()[:3] == ["c", "0/?", "planned"]
    assert "  b layer-000 (attempt 1): module q: NaN" in lines
