"""``analyze: true`` and ``python -m pipeline report`` (issue 15, point 5): every shard of a core-space merge
carries the analysis of its modules, computed from the cores the worker built; the report is what
``coremerge analyze`` computes for the same merge, and it follows the job's fingerprints."""

from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest

from coremerge import analyze
from pipeline.driver import run_job_file
from pipeline.report import report_file

from pipeline_helpers import json_lines, write_job

pytestmark = pytest.mark.usefixtures("ray_session")

JOB = """
output_dir: out
workers: 1
gpus_per_worker: 0
cpus_per_worker: 1
{analyze}
merges:
  - name: m
    adapters: [adapters/snli, adapters/mnli, {{path: adapters/rte, weight: 0.5}}]
    method: tsv
    alpha: 0.9
  - name: dense
    adapters: [adapters/snli, adapters/mnli]
    space: full
sweeps:
  - name: s
    adapters: [adapters/snli, adapters/mnli, adapters/rte]
    method: [ta, ties]
    alpha: [0.5, 1.0]
"""


def _by_key(rows):
    return {(r["module"], r["task"]): r for r in rows}


def test_the_report_is_coremerge_analyze_of_each_merge(tmp_path, adapters, capsys):
    job = write_job(tmp_path / "job.yaml", JOB.format(analyze="analyze: true"))
    assert run_job_file(job) == 0
    capsys.readouterr()
    assert report_file(job) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"wrote {tmp_path / 'out' / 'report'}: 5 merges analysed (225 rows)"
    assert "dense: not analysed (a full-space merge" in out
    report = tmp_path / "out" / "report"
    assert analyze.is_analysis_report(report)
    rows = pq.read_table(report / analyze.TABLE_NAME).to_pylist()
    # the same figures as coremerge analyze of the same merge, in another process's arithmetic
    specs = analyze.merge_specs(["tsv"], alpha=0.9, weights=[1.0, 1.0, 0.5], num_adapters=3)
    alone = _by_key(analyze.analyze(adapters, specs).rows)
    mine = _by_key([r for r in rows if r["merge"] == "m"])
    assert mine.keys() == alone.keys() and len(mine) == 3 * 3 * 4 + 3 * 3  # attention: 3 tasks; MLP: rte
    for key, want in alone.items():
        got = mine[key]
        assert got["sar"] == pytest.approx(want["sar"], abs=1e-5)
        assert got["sar_k"] == want["sar_k"] and got["merged_rank_99"] == want["merged_rank_99"]
        assert got["merged_sv"] == pytest.approx(want["merged_sv"], rel=1e-5, abs=1e-7)
        assert got["truncation_error"] == pytest.approx(want["truncation_error"], abs=1e-5)
        assert got["cosine"] == pytest.approx(want["cosine"], abs=1e-6)
    # a sweep's members share their cores: alignment does not depend on alpha, the spectrum scales with it
    half = _by_key([r for r in rows if r["merge"] == "s-ta-a0.5"])
    whole = _by_key([r for r in rows if r["merge"] == "s-ta-a1.0"])
    for key, row in half.items():
        assert row["sar"] == whole[key]["sar"] or (math.isnan(row["sar"]) and math.isnan(whole[key]["sar"]))
        assert [2 * x for x in row["merged_sv"]] == pytest.approx(whole[key]["merged_sv"], rel=1e-6)
    assert not [r for r in rows if r["merge"] == "dense"]
    summary = (report / analyze.SUMMARY_NAME).read_text()
    assert "| m | 0.9 |" in summary and "Note: dense: not analysed" in summary


def test_turning_analyze_on_redoes_the_shards_once(tmp_path, adapters, capsys):
    job = write_job(tmp_path / "job.yaml", JOB.format(analyze=""))
    assert run_job_file(job) == 0
    capsys.readouterr()
    assert report_file(job) == 1  # the job file does not ask for it
    assert "does not say `analyze: true`" in capsys.readouterr().err
    job.write_text(JOB.format(analyze="analyze: {sar_energy: 0.9}"))
    assert run_job_file(job) == 0
    start = next(e for e in json_lines(capsys.readouterr().out) if e["event"] == "start")
    assert (start["shards"], start["to_do"]) == (6 * 3, 5 * 3)  # the core-space merges' shards, with analysis
    assert report_file(job) == 0
    rows = pq.read_table(tmp_path / "out" / "report" / analyze.TABLE_NAME).to_pylist()
    assert {r["merge"] for r in rows} == {"m", "s-ta-a0.5", "s-ta-a1.0", "s-ties-a0.5", "s-ties-a1.0"}
    assert run_job_file(job) == 0  # and again: nothing to redo
    start = next(e for e in json_lines(capsys.readouterr().out) if e["event"] == "start")
    assert start["to_do"] == 0


def test_a_report_before_any_run_says_so(tmp_path, adapters, capsys):
    job = write_job(tmp_path / "job.yaml", JOB.format(analyze="analyze: true"))
    assert report_file(job) == 1
    err = capsys.readouterr().err
    assert err.startswith("pipeline: error: nothing analysed yet") and err.count("\n") == 1
    assert not (tmp_path / "out" / "report").exists()


def test_a_report_directory_the_job_did_not_write_is_never_replaced(tmp_path, adapters, capsys):
    job = write_job(tmp_path / "job.yaml", JOB.format(analyze="analyze: true"))
    assert run_job_file(job) == 0
    mine = tmp_path / "out" / "report"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert report_file(job) == 1
    err = capsys.readouterr().err
    assert "refusing to replace it" in err and err.count("\n") == 1
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".report")]  # no temp left
