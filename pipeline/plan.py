"""Planning: merges -> shards (rows of the manifest) and tasks (units of work for an actor).

A *shard* is one transformer layer's modules (``shard_by: layer``, the default) or one
module (``shard_by: module``) of one merge; its id is stable across runs ("layer-007").
A *task* is one shard of one adapter set for every merge that shares that set, so that a
sweep builds each module's reference bases and core matrices once. Everything here is
paths, names and hashes: no tensor is read.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from coremerge import peft_io
from coremerge.errors import AdapterChangedError
from coremerge.merge import dtype_name, open_all
from coremerge.peft_io import AdapterSource

from pipeline.config import JobSpec, MergeSpec, Sources
from pipeline.worker import InputVersion, ShardWork, Target, input_versions

SHARD_FORMAT = 3  # bump when the shard file layout or its numbers change: every shard is then redone
# 2: sweeps' bases files; bases stored contiguous (other last bits than format 1)
# 3: shard files named by their sha256, their fingerprint in the header; fingerprints of input contents
#    (sha256 of each adapter's config and weights, no longer their sizes and mtimes)
SHARD_DIR = ".shards"
BASES_DIR = ".bases"  # under SHARD_DIR: one directory per adapter set (group) for the sweeps' bases files
_LAYER = re.compile(r"\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class Unit:
    """One shard of one merge: a row of the manifest."""

    merge: str
    shard: str
    modules: tuple[str, ...]
    directory: str  # where its shard file goes, relative to output_dir (the file is named by its sha256)
    fingerprint: str  # hash of everything that decides the shard's bytes


@dataclass(frozen=True)
class Task:
    """One shard of one adapter set, for every merge in ``merges`` (they share the bases)."""

    group: str
    shard: str
    adapters: tuple[str, ...]
    modules: tuple[str, ...]
    merges: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    units: Mapping[tuple[str, str], Unit]  # (merge, shard) -> unit, in job order
    tasks: tuple[Task, ...]  # every task of the job: adapter set by adapter set (job order), each in shard order
    output_keys: Mapping[str, str]  # merge -> digest of what its adapter directory is made from
    inputs: Mapping[tuple[str, ...], tuple[InputVersion, ...]]  # adapter set -> the contents planned from

    def units_of(self, merge: str) -> list[Unit]:
        return list(self._by_merge.get(merge, ()))

    @functools.cached_property
    def _by_merge(self) -> dict[str, list[Unit]]:
        out: dict[str, list[Unit]] = {}
        for unit in self.units.values():
            out.setdefault(unit.merge, []).append(unit)
        return out


def layer_of(module: str) -> int | None:
    """The transformer layer index in a module name (the first ``.N.`` component), if any.

    Example:
        >>> layer_of("model.layers.7.self_attn.q_proj"), layer_of("lm_head")
        (7, None)
    """
    match = _LAYER.search(module)
    return int(match.group(1)) if match else None


def shard_modules(modules: Sequence[str], shard_by: str) -> dict[str, tuple[str, ...]]:
    """Shard id -> its modules, in a stable order.

    Example:
        >>> shards = shard_modules(["model.layers.0.q", "model.layers.10.q", "model.layers.0.v", "lm_head"], "layer")
        >>> shards["layer-000"], list(shards)
        (('model.layers.0.q', 'model.layers.0.v'), ['layer-000', 'layer-010', 'other'])
    """
    if shard_by == "module":
        return {"module-" + re.sub(r"[^A-Za-z0-9._-]", "_", m): (m,) for m in sorted(modules)}
    layers: dict[int | None, list[str]] = {}
    for module in modules:
        layers.setdefault(layer_of(module), []).append(module)
    width = max([3] + [len(str(i)) for i in layers if i is not None])
    shards = {f"layer-{i:0{width}d}": tuple(layers[i]) for i in sorted(i for i in layers if i is not None)}
    if None in layers:
        shards["other"] = tuple(layers[None])
    return shards


def group_id(merge: MergeSpec) -> str:
    """The adapter set (and compute dtype) of a merge: merges with equal ids share bases."""
    key = json.dumps([merge.adapter_set, dtype_name(merge.options.compute_dtype)])
    return "set-" + hashlib.sha256(key.encode()).hexdigest()[:10]


def make_plan(job: JobSpec, sources: Sources) -> Plan:
    """Every shard of every merge, and the tasks that compute them."""
    units: dict[tuple[str, str], Unit] = {}
    groups: dict[str, list[MergeSpec]] = {}
    for merge in job.merges:
        groups.setdefault(group_id(merge), []).append(merge)
    inputs = {ids: _input_versions(sources, ids) for ids in list(sources)}  # hashes every input (cached)
    identities = {ids: _adapter_identity(versions) for ids, versions in inputs.items()}
    tasks: list[Task] = []
    for group, merges in groups.items():
        adapters = merges[0].adapter_set
        shards = shard_modules(peft_io.union_modules(sources[adapters]), job.shard_by)
        for shard, modules in shards.items():
            for merge in merges:
                units[(merge.name, shard)] = Unit(
                    merge=merge.name, shard=shard, modules=modules, directory=f"{SHARD_DIR}/{merge.name}",
                    fingerprint=_fingerprint(merge, modules, identities[adapters], analyze_of(job, merge)))
            tasks.append(Task(group=group, shard=shard, adapters=adapters, modules=modules,
                              merges=tuple(m.name for m in merges)))
    by_merge: dict[str, list[Unit]] = {}
    for unit in units.values():
        by_merge.setdefault(unit.merge, []).append(unit)
    ordered = {(u.merge, u.shard): u for m in job.merges for u in by_merge[m.name]}  # job order
    keys = {m.name: _output_key(m, sources[m.adapter_set], by_merge[m.name]) for m in job.merges}
    return Plan(units=ordered, tasks=tuple(tasks), output_keys=keys, inputs=inputs)


def _output_key(merge: MergeSpec, sources: Sequence[AdapterSource], units: Sequence[Unit]) -> str:
    """What a merge's adapter directory is made from, beyond its shards: the adapters as named and where
    they lie (the merge report says both), and the shards' fingerprints."""
    key = {"name": merge.name, "adapters": list(merge.adapters), "paths": [str(src.path) for src in sources],
           "shards": [unit.fingerprint for unit in units]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def work_of(job: JobSpec, plan: Plan, task: Task, merges: Sequence[str]) -> ShardWork:
    """What a worker gets for ``task``, restricted to ``merges`` (those still to do)."""
    units = [plan.units[(m, task.shard)] for m in merges]
    targets = tuple(Target(merge=u.merge, options=job.merge(u.merge).options, out_dtype=job.merge(u.merge).out_dtype,
                           directory=str(job.output_dir / u.directory), fingerprint=u.fingerprint,
                           analyze=analyze_of(job, job.merge(u.merge))) for u in units)
    return ShardWork(shard=task.shard, adapters=task.adapters, modules=task.modules, targets=targets,
                     bases_dir=str(job.output_dir / SHARD_DIR / BASES_DIR / task.group),
                     inputs=plan.inputs[task.adapters])


def _input_versions(sources: Sources, adapters: tuple[str, ...], tries: int = 3) -> tuple[InputVersion, ...]:
    """The set's inputs as hashed now. An adapter that changed since the job file was read (a retrained
    adapter copied in) is opened and checked again, and ``sources`` updated: the whole run then merges
    the new version (workers refuse any other)."""
    for _ in range(tries - 1):
        try:
            return input_versions(sources[adapters])
        except AdapterChangedError:
            sources[adapters] = open_all(adapters)
    return input_versions(sources[adapters])


def _adapter_identity(inputs: Sequence[InputVersion]) -> list[dict[str, str]]:
    """What an adapter set's merges are made from: the sha256 of each adapter's config and weights (in the
    job's order). Content, not size and mtime: ``cp -p`` of another adapter over one is noticed."""
    return [{"config": i.config_sha256, "weights": i.weights_sha256} for i in inputs]


def analyze_of(job: JobSpec, merge: MergeSpec) -> float | None:
    """The SAR energy share with which ``merge``'s shards are analysed, or None: only core-space merges
    of a job with ``analyze`` are (the figures come from the cores their shards build)."""
    return job.analyze if merge.options.space == "core" else None


def _fingerprint(merge: MergeSpec, modules: Sequence[str], identity: list[dict[str, object]],
                 analyze: float | None = None) -> str:
    options = {k: v for k, v in merge.options.describe().items() if k != "device"}
    key = {"format": SHARD_FORMAT, "options": options, "out_dtype": merge.out_dtype,
           "adapters": identity, "modules": list(modules)}
    if analyze is not None:  # the shard file then carries its analysis: a shard done without one is redone
        key["analyze"] = analyze
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
