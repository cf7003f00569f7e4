"""The job file: what a good one turns into, and one-line errors (exit 2) for bad ones."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import JobSpecError, load_job

from pipeline_helpers import write_job

GOOD = """
output_dir: out/
workers: 2
gpus_per_worker: 0
merges:
  - name: nli-tsv
    adapters: [adapters/snli, adapters/mnli, {path: adapters/rte, weight: 0.5}]
    method: tsv
    space: core
    alpha: 0.9
  - name: nli-ties
    adapters: [adapters/snli, adapters/mnli, adapters/rte]
    method: ties
    params: {density: 0.3}
    dtype: bfloat16
sweeps:
  - name: nli-sweep
    adapters: [adapters/snli, adapters/mnli, adapters/rte]
    method: [ta, ties, tsv, iso_c]
    alpha: [0.3, 0.5, 0.7, 0.9]
    params: {density: 0.7}
"""


def test_good_job(tmp_path, adapters):
    job, sources = load_job(write_job(tmp_path / "job.yaml", GOOD))
    assert job.output_dir == tmp_path / "out"  # relative to the job file
    assert (job.workers, job.gpus_per_worker, job.shard_by, job.max_in_flight_per_worker) == (2, 0.0, "layer", 2)
    names = [m.name for m in job.merges]
    assert names[:3] == ["nli-tsv", "nli-ties", "nli-sweep-ta-a0.3"]
    assert len(names) == 2 + 16 and len(set(names)) == len(names)
    tsv, ties = job.merge("nli-tsv"), job.merge("nli-ties")
    assert tsv.adapters == tuple(str(p) for p in adapters)
    assert tsv.options.weights == (1.0, 1.0, 0.5) and tsv.options.alpha == 0.9
    assert ties.options.params == {"density": 0.3} and ties.out_dtype == "bfloat16"
    assert tsv.out_dtype == "float32"  # the inputs' dtype, as coremerge merge picks it
    # a swept parameter goes to the methods that have it, and only to them
    assert job.merge("nli-sweep-ties-a0.5").options.params == {"density": 0.7}
    assert job.merge("nli-sweep-ta-a0.5").options.params == {}
    assert list(sources) == [tsv.adapter_set]  # one adapter set, opened once


def test_sweep_of_parameters_names_members(tmp_path, adapters):
    job, _ = load_job(write_job(tmp_path / "job.yaml", """
        output_dir: out
        sweeps:
          - name: s
            adapters: [adapters/snli, adapters/mnli]
            method: dare
            params: {density: [0.1, 0.5]}
            seed: [1, 2]
            dtype: [float32, bfloat16]
    """))
    names = sorted(m.name for m in job.merges)
    assert names == sorted(f"s-seed{s}-{d}-density{p}" for s in (1, 2) for d in ("float32", "bfloat16")
                           for p in (0.1, 0.5))
    member = job.merge("s-seed2-bfloat16-density0.5")
    assert (member.options.seed, member.out_dtype, member.options.params["density"]) == (2, "bfloat16", 0.5)
    assert member.options.compute_dtype == torch.float32


BAD = [
    ("output_dir: out\nmerges: []\nfoo: 1\n", "job.yaml: foo: unknown key 'foo'; expected one of"),
    ("merges: [{name: a, adapters: [adapters/snli]}]\n", "job.yaml: output_dir: missing"),
    ("output_dir: out\nmerges: [{name: a, adapters: [adapters/snli], bogus: 1}]\n",
     "job.yaml: merges[0].bogus: unknown key 'bogus'"),
    ("output_dir: out\nmerges: [{name: a, adapters: [adapters/snli]}, {name: b, adapters: [adapters/snli], method: nope}]\n",
     "job.yaml: merges[1].method: unknown merge method 'nope'; expected one of: ta, ties"),
    ("output_dir: out\nmerges: [{name: a, adapters: [adapters/snli], method: ties, params: {foo: 1}}]\n",
     "job.yaml: merges[0].params: unknown hyper-parameter(s) foo for merge method 'ties'; valid hyper-parameters: density"),
    ("output_dir: out\nmerges: [{name: a, adapters: [adapters/snli], method: ties, params: {density: 2}}]\n",
     "job.yaml: merges[0].params: merge method 'ties': density"),
    ("output_dir: out\nmerges: [{name: a, adapters: [adapters/snli, ./adapters/missing]}]\n",
     "job.yaml: merges[0].adapters: adapter"),
    ("output_dir: out\nmerges: [{name: a, adapters: [adapters/snli]}, {name: a, adapters: [adapters/mnli]}]\n",
     "job.yaml: merges[1]: duplicate merge name 'a' (also at merges[0])"),
    ("output_dir: out\nmerges: [{name: s-ta-a0.5, adapters: [adapters/snli]}]\n"
     "sweeps: [{name: s, adapters: [adapters/snli], method: [ta], alpha: [0.5]}]\n",
     "duplicate merge name 's-ta-a0.5'"),
    ("output_dir: out\nmerges: [{name: ../escape, adapters: [adapters/snli]}]\n", "merges[0].name: bad merge name '../escape'"),
    ("output_dir: out\nmerges: [{name: a/b, adapters: [adapters/snli]}]\n", "merges[0].name: bad merge name 'a/b'"),
    ("output_dir: out\nmerges: [{name: '..', adapters: [adapters/snli]}]\n", "merges[0].name: bad merge name '..'"),
    ("output_dir: out\nmerges: [{name: .hidden, adapters: [adapters/snli]}]\n", "bad merge name '.hidden'"),
    ("output_dir: out\nmerges: [{name: manifest, adapters: [adapters/snli]}]\n", "merge name 'manifest' is reserved"),
    ("output_dir: out\nmerges: [{name: a, adapters: [adapters/snli], alpha: x}]\n", "merges[0]: alpha must be a finite number"),
    ("output_dir: out\nmerges: [{name: a, adapters: [{path: adapters/snli, weight: 1, w: 2}]}]\n",
     "merges[0].adapters[0].w: unknown key 'w'; expected one of: path, weight"),
    ("output_dir: out\nmerges: [{name: a, adapters: [adapters/snli], dtype: float8}]\n", "merges[0].dtype: unknown output dtype"),
    ("output_dir: out\nmerges: [{name: a, adapters: [adapters/snli], space: dense}]\n", "merges[0].space: unknown merge space"),
    ("output_dir: out\nworkers: 0\nmerges: [{name: a, adapters: [adapters/snli]}]\n", "job.yaml: workers: expected an integer >= 1"),
    ("output_dir: out\nshard_by: row\nmerges: [{name: a, adapters: [adapters/snli]}]\n", "shard_by: expected one of: layer, module"),
    ("output_dir: out\nmerges: []\n", "job.yaml: merges: no merges"),
    ("output_dir: out\nsweeps: [{name: s, adapters: [adapters/snli], method: [ta], params: {foo: [1]}}]\n",
     "sweeps[0].params: unknown parameter 'foo' for method(s) ta"),
    ("output_dir: out\nsweeps: [{name: s, adapters: [adapters/snli], alpha: []}]\n", "sweeps[0].alpha: empty list"),
    ("output_dir: out\nmerges:\n  - name: a\n   adapters: [x]\n", "job.yaml: not valid YAML at line"),
    ("- just a list\n", "job.yaml: expected a mapping"),
]


@pytest.mark.parametrize("text, expected", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_job_is_one_line(tmp_path, adapters, monkeypatch, text, expected):
    monkeypatch.chdir(tmp_path)
    write_job(tmp_path / "job.yaml", text)
    with pytest.raises(JobSpecError) as info:
        load_job(Path("job.yaml"))
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_bad_job_exits_2_before_any_work(tmp_path, adapters):
    job = write_job(tmp_path / "job.yaml", """
        output_dir: out
        merges:
          - name: ok
            adapters: [adapters/snli, adapters/mnli]
          - name: broken
            adapters: [adapters/snli, /nonexistent/adapter]
    """)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(job)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pipeline: error: {job}: merges[1].adapters: ")
    assert "/nonexistent/adapter" in lines[0]
    assert not (tmp_path / "out").exists()  # nothing started, nothing written
