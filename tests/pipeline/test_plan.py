"""Planning: shards by layer (or module) with stable ids; one task per shard of an adapter set."""

from __future__ import annotations

import dataclasses
import os

from pipeline.config import load_job
from pipeline.plan import group_id, layer_of, make_plan, shard_modules

from pipeline_helpers import write_job

JOB = """
output_dir: out
shard_by: {shard_by}
merges:
  - name: tsv
    adapters: [adapters/snli, adapters/mnli, adapters/rte]
    method: tsv
  - name: pair
    adapters: [adapters/snli, adapters/mnli]
sweeps:
  - name: sw
    adapters: [adapters/snli, adapters/mnli, adapters/rte]
    method: [ta, iso_c]
"""


def test_layer_of():
    assert layer_of("model.layers.12.mlp.down_proj") == 12
    assert layer_of("vision_model.encoder.layers.3.self_attn.q_proj") == 3
    assert layer_of("transformer.h.0.attn.c_attn") == 0
    assert layer_of("lm_head") is None


def test_shards_by_layer_are_stable_and_complete():
    modules = [f"model.layers.{i}.self_attn.{m}" for i in (10, 2, 0) for m in ("v_proj", "q_proj")] + ["lm_head"]
    shards = shard_modules(modules, "layer")
    assert list(shards) == ["layer-000", "layer-002", "layer-010", "other"]
    assert shards["layer-002"] == ("model.layers.2.self_attn.v_proj", "model.layers.2.self_attn.q_proj")
    assert sorted(m for ms in shards.values() for m in ms) == sorted(modules)
    assert shard_modules(modules, "layer") == shards  # the same ids on every run
    by_module = shard_modules(modules, "module")
    assert len(by_module) == len(modules) and "module-model.layers.0.self_attn.q_proj" in by_module


def test_plan_groups_merges_sharing_adapters(tmp_path, adapters):
    job, sources = load_job(write_job(tmp_path / "job.yaml", JOB.format(shard_by="layer")))
    plan = make_plan(job, sources)
    assert len(plan.units) == 4 * 3  # 4 merges x 3 layers
    tasks = [t for t in plan.tasks]
    # the three merges on snli+mnli+rte share one task per layer (bases built once); the pair has its own
    assert sorted(len(t.merges) for t in tasks) == [1, 1, 1, 3, 3, 3]
    three = next(t for t in tasks if len(t.merges) == 3)
    assert set(three.merges) == {"tsv", "sw-ta", "sw-iso_c"}
    assert len(three.modules) == 7  # q, k, v, o of all three and the MLP of rte
    # adapter set after adapter set, in job order, layers in order: in a batch the first merges
    # finish (and are written) while the later ones still merge
    groups = [t.group for t in tasks]
    assert groups == sorted(groups, key=lambda g: groups.index(g)) and groups[0] == group_id(job.merges[0])
    for group in set(groups):
        assert [t.shard for t in tasks if t.group == group] == ["layer-000", "layer-001", "layer-002"]
    # a task is paths and names only: no tensor ever goes through the driver
    for task in tasks:
        for field in dataclasses.fields(task):
            value = getattr(task, field.name)
            assert isinstance(value, str) or all(isinstance(v, str) for v in value)
    unit = plan.units[("tsv", "layer-001")]
    assert unit.directory == ".shards/tsv"  # the shard file is named by its hash when written


def test_fingerprint_follows_inputs_and_options(tmp_path, adapters):
    path = write_job(tmp_path / "job.yaml", JOB.format(shard_by="module"))
    first = make_plan(*load_job(path))
    again = make_plan(*load_job(path))
    assert {k: u.fingerprint for k, u in first.units.items()} == {k: u.fingerprint for k, u in again.units.items()}
    write_job(path, JOB.format(shard_by="module").replace("method: tsv", "method: tsv\n    alpha: 0.5"))
    changed = make_plan(*load_job(path))
    diff = {k for k in first.units if first.units[k].fingerprint != changed.units[k].fingerprint}
    assert diff and all(merge == "tsv" for merge, _ in diff)
    os.utime(adapters[0] / "adapter_model.safetensors", ns=(1, 1))  # touched, same content: same work
    touched = make_plan(*load_job(path))
    assert {k: u.fingerprint for k, u in touched.units.items()} == {k: u.fingerprint for k, u in changed.units.items()}
    weights = adapters[0] / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor, size and mtime kept
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(1, 1))
    touched = make_plan(*load_job(path))
    assert all(touched.units[k].fingerprint != changed.units[k].fingerprint for k in touched.units
               if str(adapters[0]) in job_adapters(path, k[0]))


def job_adapters(path, merge):
    job, _ = load_job(path, open_adapters=False)
    return job.merge(merge).adapters
