"""The job file: what a good one turns into, and one-line errors (exit 2) for bad ones."""

from __future__ import annotations

import os
import shutil
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


# --- issue 12: sweeps expand to what each method takes (point 13) ------------------------------------
def test_a_swept_parameter_goes_only_to_the_methods_that_take_it(tmp_path, adapters):
    job, _ = load_job(write_job(tmp_path / "job.yaml", """
        output_dir: out
        sweeps:
          - name: s
            adapters: [adapters/snli, adapters/mnli]
            method: [ta, ties, tsv, iso_c]
            params: {density: [0.3, 0.7]}
    """))
    assert [m.name for m in job.merges] == ["s-ta", "s-ties-density0.3", "s-ties-density0.7", "s-tsv", "s-iso_c"]
    assert [(m.options.method, dict(m.options.params)) for m in job.merges] == [
        ("ta", {}), ("ties", {"density": 0.3}), ("ties", {"density": 0.7}), ("tsv", {}), ("iso_c", {})]


def test_the_issue_sweep_with_alphas_has_twenty_distinct_merges(tmp_path, adapters):
    job, _ = load_job(write_job(tmp_path / "job.yaml", """
        output_dir: out
        sweeps:
          - name: s
            adapters: [adapters/snli, adapters/mnli, adapters/rte]
            method: [ta, ties, tsv, iso_c]
            alpha: [0.3, 0.7]
            params: {density: [0.3, 0.7]}
    """))
    expected = [f"s-{m}-a{a}" for m in ("ta",) for a in (0.3, 0.7)]
    expected += [f"s-ties-a{a}-density{d}" for a in (0.3, 0.7) for d in (0.3, 0.7)]
    expected += [f"s-{m}-a{a}" for m in ("tsv", "iso_c") for a in (0.3, 0.7)]
    assert [m.name for m in job.merges] == expected  # 2 + 4 + 2 + 2, in the order of the lists
    described = {(m.options.method, m.options.alpha, tuple(sorted(m.options.params.items()))) for m in job.merges}
    assert len(described) == len(job.merges)  # no two members are the same merge


def test_a_swept_seed_goes_only_to_random_methods(tmp_path, adapters):
    job, _ = load_job(write_job(tmp_path / "job.yaml", """
        output_dir: out
        sweeps:
          - name: s
            adapters: [adapters/snli, adapters/mnli]
            method: [ta, dare]
            seed: [1, 2]
            params: {density: [0.2]}
    """))
    assert [(m.name, m.options.seed) for m in job.merges] == [("s-ta", 0), ("s-dare-seed1-density0.2", 1),
                                                              ("s-dare-seed2-density0.2", 2)]
    write_job(tmp_path / "job.yaml", """
        output_dir: out
        sweeps: [{name: s, adapters: [adapters/snli], method: [ta, tsv], seed: [1, 2]}]
    """)
    with pytest.raises(JobSpecError, match=r"sweeps\[0\].seed: swept, but no method of the sweep \(ta, tsv\) is "):
        load_job(tmp_path / "job.yaml")


# --- issue 12: the job file itself (points 7 and 14) ---------------------------------------------------
BAD_FILES = [
    ("output_dir: out\nmerges: [{name: a, adapters: [adapters/snli]}]\noutput_dir: elsewhere\n",
     "job.yaml: duplicate key 'output_dir' at lines 1 and 3; give each key once"),
    ("output_dir: out\nmerges:\n  - name: a\n    adapters: [adapters/snli]\n    alpha: 0.5\n    alpha: 2\n",
     "job.yaml: duplicate key 'alpha' at lines 5 and 6"),
    ("output_dir: out\nmerges: [{name: a, adapters: [{path: adapters/snli, weight: 1, weight: 3}]}]\n",
     "job.yaml: duplicate key 'weight' at line 2 (columns 53 and 64)"),
    ("[" * 100_000, "job.yaml: nested too deeply"),
    ("- " * 100_000 + "x\n", "job.yaml: nested too deeply"),
    (b"output_dir: out\nmerges: [{name: caf\xe9, adapters: [adapters/snli]}]\n",
     "job.yaml: not UTF-8 text (byte 0xe9 on line 2); save the job file as UTF-8"),
    ("output_dir: out\nplacement_timeout_s: 0\nmerges: [{name: a, adapters: [adapters/snli]}]\n",
     "job.yaml: placement_timeout_s: expected a number > 0, got 0"),
    ("output_dir: out\nstall_timeout_s: .inf\nmerges: [{name: a, adapters: [adapters/snli]}]\n",
     "job.yaml: stall_timeout_s: expected a number > 0, got inf"),
    ("output_dir: out\nstall_timeout_s: soon\nmerges: [{name: a, adapters: [adapters/snli]}]\n",
     "job.yaml: stall_timeout_s: expected a number > 0, got 'soon'"),
    ("output_dir: out\nsweeps: [{name: s, adapters: [adapters/snli], alpha: [0.5, 1, 0.5]}]\n",
     "job.yaml: sweeps[0].alpha: 0.5 is listed twice"),
    ("output_dir: out\nanalyze: 3\nmerges: [{name: a, adapters: [adapters/snli]}]\n",
     "job.yaml: analyze: expected true, false or a mapping {sar_energy: 0.95}; got int 3"),
    ("output_dir: out\nanalyze: {sar_energy: 1.5}\nmerges: [{name: a, adapters: [adapters/snli]}]\n",
     "job.yaml: analyze.sar_energy: expected a share in (0, 1], got 1.5"),
    ("output_dir: out\nanalyze: {energy: 0.9}\nmerges: [{name: a, adapters: [adapters/snli]}]\n",
     "job.yaml: analyze.energy: unknown key 'energy'; expected one of: sar_energy"),
    ("output_dir: out\nmerges: [{name: report, adapters: [adapters/snli]}]\n",
     "job.yaml: merges[0].name: merge name 'report' is reserved"),
]


@pytest.mark.parametrize("text, expected", BAD_FILES, ids=[str(i) for i in range(len(BAD_FILES))])
def test_a_bad_job_file_is_one_line(tmp_path, adapters, monkeypatch, text, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(JobSpecError) as info:
        load_job(Path("job.yaml"))
    assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_analyze_defaults_off_and_is_read(tmp_path, adapters):
    text = "output_dir: out\nmerges: [{name: a, adapters: [adapters/snli]}]\n"
    assert load_job(write_job(tmp_path / "job.yaml", text))[0].analyze is None
    assert load_job(write_job(tmp_path / "job.yaml", text + "analyze: false\n"))[0].analyze is None
    assert load_job(write_job(tmp_path / "job.yaml", text + "analyze: true\n"))[0].analyze == 0.95
    assert load_job(write_job(tmp_path / "job.yaml", text + "analyze: {sar_energy: 1}\n"))[0].analyze == 1.0


def test_timeouts_default_and_are_read(tmp_path, adapters):
    text = "output_dir: out\nmerges: [{name: a, adapters: [adapters/snli]}]\n"
    job, _ = load_job(write_job(tmp_path / "job.yaml", text))
    assert (job.placement_timeout_s, job.stall_timeout_s) == (600.0, 900.0)
    job, _ = load_job(write_job(tmp_path / "job.yaml", text + "placement_timeout_s: 5\nstall_timeout_s: 0.5\n"))
    assert (job.placement_timeout_s, job.stall_timeout_s) == (5.0, 0.5)


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_job_path_that_is_no_file_is_one_line_and_never_waits(tmp_path, kind):
    path = tmp_path / "job.yaml"
    path.mkdir() if kind == "directory" else os.mkfifo(path)
    # in a child process: a FIFO opened for reading waits for a writer forever
    proc = subprocess.run([sys.executable, "-c", "import sys; from pipeline.config import load_job, JobSpecError\n"
                           "try: load_job(sys.argv[1])\nexcept JobSpecError as e: print(e); sys.exit(2)", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.strip() == f"{path}: is {'a directory' if kind == 'directory' else 'not a regular file'}; " \
                                  f"give the job's YAML file"


# --- issue 12: an output that is an input, an output_dir that cannot be written (points 1 and 14) -------
OVERLAPS = [  # (output_dir, merge name, what the message says)
    ("adapters", "snli", "merges[0]: merge 'snli': output directory {root}/adapters/snli is adapter "
                         "'{root}/adapters/snli'"),
    (".", "adapters", "merges[0]: merge 'adapters': output directory {root}/adapters contains adapter "
                      "'{root}/adapters/snli'"),
    ("link-to-adapters", "mnli", "merges[0]: merge 'mnli': output directory {root}/link-to-adapters/mnli is adapter "
                                 "'{root}/adapters/mnli'"),
    ("adapters/snli", "merged", "output_dir: the job's own directory {root}/adapters/snli/.shards lies inside "
                                "adapter '{root}/adapters/snli'"),
    ("adapters/rte/x", "y", "output_dir: the job's own directory {root}/adapters/rte/x/.shards lies inside "
                            "adapter '{root}/adapters/rte'"),
]


@pytest.mark.parametrize("opened", [True, False], ids=["opened", "paths"])
@pytest.mark.parametrize("output_dir, name, expected", OVERLAPS, ids=[o[0] for o in OVERLAPS])
def test_an_output_that_is_an_input_is_refused(tmp_path, adapters, output_dir, name, expected, opened):
    (tmp_path / "link-to-adapters").symlink_to(tmp_path / "adapters")
    job = write_job(tmp_path / "job.yaml", f"""
        output_dir: {output_dir}
        merges:
          - name: {name}
            adapters: [adapters/snli, adapters/mnli, adapters/rte]
          - name: ok
            adapters: [adapters/snli, adapters/mnli]
    """)
    with pytest.raises(JobSpecError) as info:
        load_job(job, open_adapters=opened)
    message = str(info.value)
    assert message.startswith(f"{job}: ") and "\n" not in message
    assert expected.format(root=tmp_path) in message, message


def test_an_output_that_is_the_input_of_another_merge_is_refused(tmp_path, adapters):
    job = write_job(tmp_path / "job.yaml", """
        output_dir: adapters
        merges:
          - name: first
            adapters: [adapters/snli, adapters/mnli]
          - name: rte
            adapters: [adapters/snli, adapters/mnli]
          - name: third
            adapters: [adapters/rte, adapters/mnli]
    """)
    with pytest.raises(JobSpecError, match=r"merges\[1\]: merge 'rte': output directory .*/adapters/rte is adapter"):
        load_job(job)


def test_an_adapter_in_the_jobs_own_directories_is_refused(tmp_path, adapters):
    shutil.copytree(adapters[0], tmp_path / "out" / "manifest" / "snli")  # the job writes and prunes these
    job = write_job(tmp_path / "job.yaml", """
        output_dir: out
        merges: [{name: a, adapters: [out/manifest/snli, adapters/mnli]}]
    """)
    with pytest.raises(JobSpecError) as info:
        load_job(job)
    assert str(info.value).startswith(f"{job}: output_dir: the job's own directory {tmp_path}/out/manifest contains "
                                      f"adapter '{tmp_path}/out/manifest/snli'")
    shutil.copytree(adapters[0], tmp_path / "out" / "snli-copy")  # elsewhere in output_dir: fine
    write_job(job, "output_dir: out\nmerges: [{name: a, adapters: [out/snli-copy, adapters/mnli]}]\n")
    assert [m.name for m in load_job(job)[0].merges] == ["a"]


def test_an_adapter_whose_weights_are_a_link_into_output_dir_is_refused(tmp_path, adapters):
    store = tmp_path / "out" / "store"
    store.mkdir(parents=True)
    weights = adapters[0] / "adapter_model.safetensors"
    weights.rename(store / "snli.safetensors")
    weights.symlink_to(store / "snli.safetensors")
    job = write_job(tmp_path / "job.yaml", """
        output_dir: out
        merges: [{name: store, adapters: [adapters/snli, adapters/mnli]}]
    """)
    with pytest.raises(JobSpecError) as info:
        load_job(job)
    assert f"output directory {store} is adapter '{adapters[0]}' ({store})" in str(info.value)


def test_an_output_dir_that_cannot_be_a_directory_is_refused(tmp_path, adapters, monkeypatch):
    (tmp_path / "afile").write_text("x")
    for output_dir, expected in [("afile", f"output_dir: {tmp_path}/afile exists and is not a directory"),
                                 ("afile/out", f"output_dir: {tmp_path}/afile/out cannot be created: "
                                               f"{tmp_path}/afile is a file, not a directory")]:
        job = write_job(tmp_path / "job.yaml", f"output_dir: {output_dir}\n"
                                               f"merges: [{{name: a, adapters: [adapters/snli]}}]\n")
        with pytest.raises(JobSpecError) as info:
            load_job(job)
        assert expected in str(info.value)
    import tempfile

    def denied(*args, **kwargs):  # what a read-only file system answers, root or not
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", denied)
    job = write_job(tmp_path / "job.yaml", "output_dir: ro/out\nmerges: [{name: a, adapters: [adapters/snli]}]\n")
    with pytest.raises(JobSpecError) as info:
        load_job(job)
    assert str(info.value) == (f"{job}: output_dir: {tmp_path}/ro/out is not writable (it would be made in "
                               f"{tmp_path}): Read-only file system; choose a directory you can write")
    load_job(job, check_writable=False)  # a command that only reads the records
    assert not (tmp_path / "ro").exists()  # checking wrote nothing
