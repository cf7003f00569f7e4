"""The unit of work without Ray: a shard equals the library's merge, bases are built once per
module for every merge that shares them, a rerun writes the same bytes, a bad adapter fails
only its own merges."""

from __future__ import annotations

import json
import os

import pytest
import torch

import pipeline.worker as worker
from coremerge import peft_io, safetensors_file
from coremerge.merge import merge_module_of, parse_dtype
from coremerge.peft_io import file_sha256
from coremerge.types import LowRank
from pipeline.config import load_job
from pipeline.plan import make_plan, work_of
from pipeline.worker import read_shard, run_shard, shard_intact, storage_plan

from pipeline_helpers import poison, write_job

JOB = """
output_dir: out
merges:
  - name: tsv
    adapters: [adapters/snli, adapters/mnli, {path: adapters/rte, weight: 0.5}]
    method: tsv
    alpha: 0.9
  - name: dare
    adapters: [adapters/snli, adapters/mnli, adapters/rte]
    method: dare_ties
    params: {density: 0.5}
    seed: 7
  - name: ties-r3-bf16
    adapters: [adapters/snli, adapters/mnli, adapters/rte]
    method: ties
    rank: 3
    dtype: bfloat16
  - name: full-ta
    adapters: [adapters/snli, adapters/mnli, adapters/rte]
    space: full
  - name: pair
    adapters: [adapters/snli, adapters/mnli]
    method: iso_c
"""


def planned(tmp_path):
    job, sources = load_job(write_job(tmp_path / "job.yaml", JOB))
    return job, sources, make_plan(job, sources)


def shard_path(job, plan, record):
    """Where the worker wrote a record's shard file."""
    return job.output_dir / plan.units[(record["merge"], record["shard"])].directory / record["file"]


def task_of(plan, shard, size):
    return next(t for t in plan.tasks if t.shard == shard and len(t.merges) == size)


def test_shard_equals_library_merge(tmp_path, adapters):
    job, sources, plan = planned(tmp_path)
    task = task_of(plan, "layer-001", 4)
    srcs = sources[task.adapters]
    records = run_shard(work_of(job, plan, task, task.merges), srcs)
    assert [r["merge"] for r in records] == list(task.merges)
    for record in records:
        assert record["status"] == "done", record["error"]
        spec = job.merge(record["merge"])
        path = shard_path(job, plan, record)
        assert path.name == f"{task.shard}-{record['sha256'][:16]}.safetensors"  # named by its hash
        assert file_sha256(path) == record["sha256"] and path.stat().st_size == record["bytes"]
        assert record["max_rss_mb"] > 0 and record["device"] == "cpu"
        shard = read_shard(path)
        assert list(shard) == list(task.modules)
        for module, got in shard.items():
            got = got.to(dtype=parse_dtype(spec.out_dtype))  # as the adapter writer casts it
            want = merge_module_of(srcs, module, spec.options).to(dtype=parse_dtype(spec.out_dtype), device="cpu")
            assert got.a.dtype == want.a.dtype and torch.equal(got.a, want.a) and torch.equal(got.b, want.b)
            assert got.energy_kept == want.energy_kept


def test_bases_built_once_per_module_for_a_sweep(tmp_path, adapters, monkeypatch):
    job, sources, plan = planned(tmp_path)
    task = task_of(plan, "layer-000", 4)
    built = []
    original = worker.build_core_space
    monkeypatch.setattr(worker, "build_core_space", lambda s, module, **kw: built.append(module) or original(s, module, **kw))
    records = run_shard(work_of(job, plan, task, task.merges), sources[task.adapters])
    assert all(r["status"] == "done" for r in records)
    assert built == list(task.modules)  # once per module, for the 3 core-space merges together


def test_a_sweep_over_alpha_runs_each_method_once_per_module(tmp_path, adapters, monkeypatch):
    from coremerge.spaces import CoreSpace

    job, sources = load_job(write_job(tmp_path / "job.yaml", """
output_dir: out
sweeps:
  - name: s
    adapters: [adapters/snli, adapters/mnli, {path: adapters/rte, weight: 0.5}]
    method: [dare, tsv]
    alpha: [0.3, 0.9, 1.4]
    rank: [null, 3]
"""))
    plan = make_plan(job, sources)
    task = task_of(plan, "layer-001", 12)
    calls = []
    original = CoreSpace.merge_core
    monkeypatch.setattr(CoreSpace, "merge_core", lambda self, method, **kw: calls.append(method) or original(self, method, **kw))
    srcs = sources[task.adapters]
    records = run_shard(work_of(job, plan, task, task.merges), srcs)
    assert {r["status"] for r in records} == {"done"}
    assert sorted(calls) == sorted(["dare", "tsv"] * len(task.modules))  # not once per alpha or rank
    monkeypatch.setattr(CoreSpace, "merge_core", original)
    # 12 members share one bases file (u, v of every module, once); each shard file holds its small factors
    [bases] = (job.output_dir / ".shards" / ".bases").glob("*/layer-001-*.safetensors")
    shapes = {m: next(src.modules[m] for src in srcs if m in src.modules) for m in task.modules}
    plain = sum((shapes[m].out_features + shapes[m].in_features) * q * parse_dtype(job.merge(r["merge"]).out_dtype).itemsize
                for r in records for m, q in zip(task.modules, r["ranks"]))  # their LoRA factors, 12 times
    assert sum(r["bytes"] for r in records) + bases.stat().st_size < plain  # tiny modules here: 1B ones, 7x less
    assert storage_plan(work_of(job, plan, task, task.merges[:1]), srcs) == frozenset()  # one merge: plain
    for record in records:  # and each member is, bit for bit, the library's merge at its own alpha and rank
        spec = job.merge(record["merge"])
        path = shard_path(job, plan, record)
        assert shard_intact(path, record["sha256"])
        for module, got in read_shard(path).items():
            got = got.to(dtype=parse_dtype(spec.out_dtype))
            want = merge_module_of(srcs, module, spec.options).to(dtype=parse_dtype(spec.out_dtype), device="cpu")
            assert torch.equal(got.a, want.a) and torch.equal(got.b, want.b), (spec.name, module)
    bases.write_bytes(bases.read_bytes()[:-4] + b"\0\0\0\0")  # a torn bases file: its shards are not intact
    assert not any(shard_intact(shard_path(job, plan, r), r["sha256"]) for r in records)


def test_rerun_writes_identical_bytes(tmp_path, adapters):
    job, sources, plan = planned(tmp_path)
    task = task_of(plan, "layer-002", 4)
    work = work_of(job, plan, task, task.merges)
    first = [r["sha256"] for r in run_shard(work, sources[task.adapters])]
    again = [r["sha256"] for r in run_shard(work, sources[task.adapters])]
    assert first == again and None not in first
    leftovers = [p for p in (job.output_dir / ".shards").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_bad_adapter_fails_only_its_merges(tmp_path, adapters):
    poison(adapters[2], "model.layers.1.self_attn.q_proj")  # rte, layer 1
    job, sources, plan = planned(tmp_path)
    bad = task_of(plan, "layer-001", 4)
    records = run_shard(work_of(job, plan, bad, bad.merges), sources[bad.adapters])
    assert {r["status"] for r in records} == {"failed"}
    for record in records:
        assert "model.layers.1.self_attn.q_proj" in record["error"] and "NaN" in record["error"]
        assert "\n" not in record["error"] and "file" not in record
        assert not (job.output_dir / plan.units[(record["merge"], "layer-001")].directory).exists()
    fine = task_of(plan, "layer-000", 4)  # another layer of the same adapters is fine
    assert {r["status"] for r in run_shard(work_of(job, plan, fine, fine.merges), sources[fine.adapters])} == {"done"}


def test_the_unit_of_work_needs_no_ray():
    import subprocess
    import sys

    code = ("import sys, pipeline.config, pipeline.plan, pipeline.worker; "
            "print(sorted(m for m in ('ray', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_assembly_on_a_worker_equals_the_library_and_refuses_a_changed_shard(tmp_path, adapters, one_thread):
    from pipeline.assemble import AssemblyWork, run_assembly
    from pipeline_helpers import assert_same_adapter, reference_merge

    job, sources, plan = planned(tmp_path)
    spec = job.merge("tsv")
    rows = []
    for task in plan.tasks:
        if "tsv" in task.merges:
            [record] = run_shard(work_of(job, plan, task, ["tsv"]), sources[task.adapters])
            rows.append({**record, "path": str(shard_path(job, plan, record).relative_to(job.output_dir))})
    work = AssemblyWork(output_dir=str(job.output_dir), merge=spec, rows=tuple(rows), key=plan.output_keys["tsv"])
    [done] = run_assembly(work, sources[spec.adapter_set])
    assert done["status"] == "done" and done["path"] == str(job.output_dir / "tsv")
    assert_same_adapter(job.output_dir / "tsv", reference_merge(spec, tmp_path / "ref"))
    written = (job.output_dir / "tsv" / "adapter_model.safetensors").read_bytes()

    shard = job.output_dir / rows[1]["path"]
    shard.write_bytes(shard.read_bytes() + b"\0")  # changed after the manifest recorded it
    [failed] = run_assembly(work, sources[spec.adapter_set])
    assert failed["status"] == "failed" and "\n" not in failed["error"]
    assert str(shard) in failed["error"] and "run the job again" in failed["error"]
    assert (job.output_dir / "tsv" / "adapter_model.safetensors").read_bytes() == written  # left as it was


def test_shard_hash_is_remembered_only_while_the_file_is_unchanged(tmp_path, monkeypatch):
    path, sha, _ = worker.write_shard(tmp_path, "s", {"m": LowRank(a=torch.ones(2, 3), b=torch.ones(4, 2))},
                                      meta={"merge": "x"})
    assert sha == file_sha256(path)
    monkeypatch.setattr(safetensors_file, "_hash_fd", lambda fd: pytest.fail("read a file this process just wrote"))
    assert peft_io.known_sha256(path) == sha
    monkeypatch.undo()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes, another modification time
    path.write_bytes(bytes(data))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert peft_io.known_sha256(path) == file_sha256(path) != sha
    other = tmp_path / "other.safetensors"  # written by anyone else: always read and hashed
    other.write_bytes(path.read_bytes())
    assert peft_io.known_sha256(other) == file_sha256(other)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shard_file_is_what_safetensors_writes(tmp_path, dtype):
    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    merged = {"m.q": LowRank(a=torch.randn(3, 5, generator=g).to(dtype), b=torch.randn(4, 3, generator=g).to(dtype)),
              "m.k": LowRank(a=torch.randn(1, 5, generator=g).to(dtype), b=torch.randn(2, 1, generator=g).to(dtype).T.T),
              "m.v": LowRank(a=torch.randn(5, 2, generator=g).to(dtype).T, b=torch.randn(6, 2, generator=g).to(dtype))}
    path, sha, size = worker.write_shard(tmp_path, "layer-000", merged, meta={"merge": "x", "shard": "layer-000"})
    data = path.read_bytes()
    tensors = {f"{m}.{p}": getattr(lr, p).contiguous() for m, lr in merged.items() for p in ("a", "b")}
    header = json.dumps({"merge": "x", "shard": "layer-000", "modules": list(merged),
                         "energy_kept": dict.fromkeys(merged)}, sort_keys=True)
    assert data == save(tensors, metadata={worker.META_KEY: header})
    assert (sha, size) == (file_sha256(path), len(data))
    got = read_shard(path)
    assert all(torch.equal(got[m].a, merged[m].a) and torch.equal(got[m].b, merged[m].b) for m in merged)
