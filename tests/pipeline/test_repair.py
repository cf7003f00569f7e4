"""A rerun repairs what it finds damaged and loses nothing it can prove: outputs with a file missing
or corrupt are rebuilt (never a directory this tool did not write), leftovers of killed writers go,
a damaged manifest is rebuilt from the shard files, and a full disk at the last manifest save loses
no recorded failure (issue 12, points 4, 5 and 6)."""

from __future__ import annotations

import errno
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.driver import run_job_file
from pipeline.manifest import read_manifest

from pipeline_helpers import json_lines, poison, write_job

pytestmark = pytest.mark.usefixtures("ray_session")

JOB = """
output_dir: out
workers: 1
gpus_per_worker: 0
cpus_per_worker: 1
merges:
  - name: tsv
    adapters: [adapters/snli, adapters/mnli]
    method: tsv
  - name: ties
    adapters: [adapters/snli, adapters/mnli, adapters/rte]
    method: ties
"""


def rows(out):
    return {(r["merge"], r["shard"]): r for r in read_manifest(out).to_pylist()}


def snapshot(out):
    """Every file of the merged adapters (reports without their timings) and of the shards."""
    files = {}
    for merge in ("tsv", "ties"):
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            files[f"{merge}/{name}"] = (out / merge / name).read_bytes()
        report = json.loads((out / merge / "merge_report.json").read_text())
        report.pop("timings_s")
        files[f"{merge}/merge_report.json"] = report
    for path in sorted((out / ".shards").rglob("*.safetensors")):
        files[str(path.relative_to(out))] = (path.stat().st_mtime_ns, path.read_bytes())
    return files


@pytest.fixture
def finished(tmp_path, adapters, one_thread, capsys):
    job = write_job(tmp_path / "job.yaml", JOB)
    assert run_job_file(job) == 0
    capsys.readouterr()
    return job, tmp_path / "out", snapshot(tmp_path / "out"), rows(tmp_path / "out")


DAMAGE = {
    "config missing": lambda d: (d / "adapter_config.json").unlink(),
    "report missing": lambda d: (d / "merge_report.json").unlink(),
    "config corrupt": lambda d: (d / "adapter_config.json").write_text('{"r": 16'),
    "report corrupt": lambda d: (d / "merge_report.json").write_bytes(b"\0" * 10),
    "report edited": lambda d: (d / "merge_report.json").write_text(
        (d / "merge_report.json").read_text().replace('"method": "tsv"', '"method": "ties"')),
    "weights truncated": lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:100]),
    "weights missing": lambda d: (d / "adapter_model.safetensors").unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_adapter_is_rebuilt_from_its_shards(finished, damage, capsys):
    job, out, before, first = finished
    DAMAGE[damage](out / "tsv")
    assert run_job_file(job) == 0
    assert snapshot(out) == before  # the same files, shards untouched (not even rewritten)
    assert rows(out).keys() == first.keys()
    assert all(rows(out)[k]["finished_at"] == first[k]["finished_at"] for k in first)  # no shard redone
    written = [e for e in json_lines(capsys.readouterr().out) if e["event"] == "merge_written"]
    assert [e["merge"] for e in written] == ["tsv"] and written[0]["by"] == "driver"  # Ray not needed


def test_a_directory_this_tool_did_not_write_is_never_replaced(finished, capsys):
    job, out, _, _ = finished
    (out / "mine").mkdir()
    (out / "mine" / "notes.txt").write_text("the user's")
    write_job(job, JOB + "  - name: mine\n    adapters: [adapters/snli, adapters/rte]\n")
    assert run_job_file(job) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mine" in err[0] and "not an adapter coremerge wrote" in err[0]
    assert (out / "mine" / "notes.txt").read_text() == "the user's"
    # a symlink in its place is not ours either, even to a merged adapter
    shutil.rmtree(out / "mine")
    (out / "mine").symlink_to(out / "tsv")
    assert run_job_file(job) == 2
    assert (out / "mine").is_symlink() and (out / "tsv" / "adapter_model.safetensors").is_file()


def test_leftovers_of_killed_writers_are_removed(finished, capsys):
    job, out, before, first = finished
    shutil.copytree(out / "tsv", out / ".tsv.tmp-host-123-abcd1234")  # killed while writing
    shutil.copytree(out / "ties", out / ".ties.old-host-456-zz")  # killed between two renames
    (out / "manifest" / ".manifest.parquet.999.tmp").write_bytes(b"half a manifest")
    (out / ".shards" / "tsv" / ".999.1.tmp").write_bytes(b"half a shard")
    (out / ".tsv.notes").write_text("not ours: kept")
    assert run_job_file(job) == 0
    start = next(e for e in json_lines(capsys.readouterr().out) if e["event"] == "start")
    assert start["leftovers_removed"] == 3 and start["to_do"] == 0
    assert sorted(p.name for p in out.iterdir()) == [".shards", ".tsv.notes", "manifest", "ties", "tsv"]
    assert not list((out / "manifest").glob("*.tmp")) and not list((out / ".shards").rglob("*.tmp"))
    assert snapshot(out) == before and rows(out) == first


def _wrong_schema(path):
    pq.write_table(pa.table({"x": [1, 2]}), path)


MANIFEST_DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "garbage": lambda p: p.write_bytes(b"PAR1" + b"\xff" * 300),
    "wrong schema": _wrong_schema,
    "unknown status": lambda p: pq.write_table(pq.read_table(p).set_column(
        2, "status", pa.array(["weird"] * pq.read_table(p).num_rows)), p),
}


@pytest.mark.parametrize("damage", list(MANIFEST_DAMAGE))
def test_a_damaged_manifest_is_rebuilt_from_the_shard_files(finished, damage, capsys):
    job, out, before, first = finished
    manifest = out / "manifest" / "manifest.parquet"
    MANIFEST_DAMAGE[damage](manifest)
    assert run_job_file(job) == 0
    events = json_lines(capsys.readouterr().out)
    [warning] = [e for e in events if e["event"] == "manifest_damaged"]
    assert warning["level"] == "warning" and "rebuilt from the shard files" in warning["message"]
    assert next(e for e in events if e["event"] == "start")["to_do"] == 0  # every shard proved from disk
    assert snapshot(out) == before  # no shard redone; adapters rewritten byte for byte
    again = rows(out)
    assert again.keys() == first.keys()
    for key, row in first.items():
        assert (again[key]["status"], again[key]["path"], again[key]["sha256"]) == ("done", row["path"], row["sha256"])
    assert (out / "manifest" / "_manifest.parquet.damaged").is_file()  # kept for a post-mortem


def test_a_full_disk_at_the_last_save_loses_no_recorded_failure(tmp_path, adapters, one_thread, capsys, monkeypatch):
    poison(adapters[2], "model.layers.1.mlp.up_proj")  # "ties" fails at layer 1
    job = write_job(tmp_path / "job.yaml", JOB)
    real = pq.write_table
    full = {"now": False}

    def write_table(table, where):
        if full["now"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(table, where)
        full["now"] = "failed" in table.column("status").to_pylist()  # the disk fills up right after

    monkeypatch.setattr(pq, "write_table", write_table)
    assert run_job_file(job) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert err[-2].startswith("pipeline: 1 of 2 merged adapters are in ") and "; 1 failed (ties)" in err[-2]
    assert err[-1].startswith("pipeline: error: the manifest could not be saved (No space left on device)")
    finished_event = json_lines(captured.out)[-1]
    assert finished_event["failed_merges"] == ["ties"] and "NaN" in finished_event["errors"]["ties"]
    monkeypatch.undo()
    saved = rows(tmp_path / "out")  # the failure reached the disk before it filled up
    assert saved[("ties", "layer-001")]["status"] == "failed" and "NaN" in saved[("ties", "layer-001")]["error"]
