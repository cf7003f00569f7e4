"""The job file: YAML in, validated dataclasses out, before any work starts.

Every error is one line that names the file, the key path and what was expected, e.g.
``job.yaml: merges[1].params: unknown hyper-parameter(s) foo for merge method 'ties'; ...``.
The driver turns :class:`JobSpecError` into exit status 2.

Example job file::

    output_dir: out/
    workers: 2                 # default: one per GPU, or one per 2 CPUs without GPUs
    gpus_per_worker: 1         # default: 1 when the cluster has GPUs, else 0
    placement_timeout_s: 600   # default 600: no merge actor placed in this long -> exit 1 with the reason
    stall_timeout_s: 900       # default 900: no shard finished in this long -> log what each actor does
    analyze: true              # default false: also analyse each core-space merge (coremerge analyze), per
                               # shard, from the cores it builds; `python -m pipeline report` writes it out
    merges:
      - name: nli-tsv
        adapters: [adapters/snli, adapters/mnli, {path: adapters/rte, weight: 0.5}]
        method: tsv
        alpha: 0.9
    sweeps:                    # every combination of the listed values becomes a merge
      - name: nli-sweep
        adapters: [adapters/snli, adapters/mnli, adapters/rte]
        method: [ta, ties, tsv, iso_c]
        alpha: [0.3, 0.5, 0.7, 0.9]      # -> nli-sweep-ta-a0.3, nli-sweep-ta-a0.5, ...
        params: {density: [0.3, 0.7]}    # ties only: nli-sweep-ties-a0.3-density0.3, ...

A swept hyper-parameter (a list under ``params``) goes only to the methods that take it, and a swept
``seed`` only to the random methods (dare, dare_ties); a member's name carries only the values that
apply to it. The example sweep is 20 merges: ta, tsv and iso_c once per alpha (3 x 4), ties once per
alpha and density (4 x 2). A swept key that applies to none of the sweep's methods is an error.

Relative paths (adapters, output_dir) resolve against the job file's directory. Duplicate keys (at any
level) are refused. No merge may write where it would destroy an input: no ``output_dir/<name>`` (nor
the job's own ``output_dir/.shards`` and ``output_dir/manifest``) may be, contain or lie inside any
adapter of the job (symlinks resolved; see :mod:`coremerge.paths`); adapters elsewhere under
``output_dir`` are fine. ``output_dir`` must be a directory this user can write, or creatable.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import re
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from coremerge import methods
from coremerge.hub import parse_hub_id
from coremerge.merge import MergeOptions, dtype_name, open_all, output_dtype, parse_dtype
from coremerge.paths import OutputOverlapError, check_output_not_input, existing_ancestor
from coremerge.peft_io import AdapterSource
from coremerge.spaces import check_space

SHARD_BY = ("layer", "module")
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")
RESERVED_NAMES = frozenset({"manifest", "report"})  # output_dir/manifest holds the manifest; report: the report

_JOB_KEYS = ("output_dir", "workers", "gpus_per_worker", "cpus_per_worker", "shard_by",
             "max_in_flight_per_worker", "retries", "placement_timeout_s", "stall_timeout_s", "analyze", "merges",
             "sweeps")
_MERGE_KEYS = ("name", "adapters", "method", "space", "alpha", "params", "rank", "seed", "dtype", "compute_dtype")
_SWEPT_KEYS = ("method", "space", "alpha", "rank", "seed", "dtype", "compute_dtype")  # may be lists in a sweep
_NAME_TOKEN = {"alpha": "a", "rank": "r", "seed": "seed"}  # sweep-member name prefix; others: the bare value
_JOB_DIRS = (".shards", "manifest", "report")  # what the job writes in output_dir besides the merges
_MAX_JOB_BYTES = 16 << 20  # a job file of a thousand merges is a few hundred kB


class JobSpecError(ValueError):
    """A bad job file; the message is one line naming the file and the key."""


@dataclass(frozen=True)
class MergeSpec:
    """One merge of the job: adapters, validated options, output dtype.

    ``options`` comes from :meth:`MergeOptions.checked` with ``device="cpu"``; the worker
    sets its own device. ``out_dtype`` is the name of the output dtype (resolved from the
    inputs when the job file gives none, exactly as ``coremerge merge`` does).
    """

    name: str
    adapters: tuple[str, ...]  # absolute directories or Hub ids, as open_all takes them
    options: MergeOptions
    out_dtype: str
    where: str  # key path in the job file, for messages

    @property
    def adapter_set(self) -> tuple[str, ...]:
        return self.adapters


@dataclass(frozen=True)
class JobSpec:
    """A validated job file. ``None`` means "decide from the cluster's resources"."""

    path: Path
    output_dir: Path
    merges: tuple[MergeSpec, ...]
    workers: int | None = None
    gpus_per_worker: float | None = None
    cpus_per_worker: float | None = None
    shard_by: str = "layer"
    max_in_flight_per_worker: int = 2
    retries: int = 3
    placement_timeout_s: float = 600.0  # no merge actor placed for this long: the job ends (exit 1)
    stall_timeout_s: float = 900.0  # no shard finished for this long while work is pending: say so
    analyze: float | None = None  # the SAR energy share of `analyze: true` (coremerge.analyze); None: off

    def merge(self, name: str) -> MergeSpec:
        return self._by_name[name]

    @functools.cached_property
    def _by_name(self) -> dict[str, MergeSpec]:
        return {m.name: m for m in self.merges}


Sources = dict[tuple[str, ...], list[AdapterSource]]  # adapter set -> its opened adapters


def load_job(path: str | Path, *, open_adapters: bool = True, check_writable: bool = True) -> tuple[JobSpec, Sources]:
    """Read and validate a job file; returns the spec and the opened adapter sets.

    ``open_adapters=False`` checks only the file itself; the adapter sets are then empty, output
    dtypes are left as given ("auto" if none) and outputs are checked against the adapter paths as
    given. ``check_writable=False`` skips the test that ``output_dir`` can be written (a command that
    only reads the job's records, on a read-only copy). Nothing is written either way.

    Example:
        >>> job, sources = load_job("job.yaml")  # doctest: +SKIP
        >>> [m.name for m in job.merges]  # doctest: +SKIP
        ['nli-tsv', 'nli-ties', 'nli-sweep-ta-a0.3', ...]
    """
    path = Path(path)
    where = str(path)
    text = _read_text(path)
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506  a SafeLoader
        return _Loader(path, open_adapters, check_writable).job(raw)
    except _DuplicateKeyError as err:
        raise JobSpecError(f"{where}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise JobSpecError(f"{where}: not valid YAML{at}: {' '.join(str(problem).split())}") from None
    except RecursionError:
        raise JobSpecError(f"{where}: nested too deeply (lists or mappings hundreds of levels deep); "
                           f"a job file is a few levels deep") from None


def _read_text(path: Path) -> str:
    """The job file as text; JobSpecError for a directory, FIFO or device (never waits on one), a file
    too large to be a job file, or bytes that are not UTF-8."""
    where = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once instead of waiting for a writer
    except OSError as err:
        raise JobSpecError(f"{where}: cannot read the job file ({err.strerror or err})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise JobSpecError(f"{where}: is {kind}; give the job's YAML file")
        if info.st_size > _MAX_JOB_BYTES:
            raise JobSpecError(f"{where}: {info.st_size} bytes is too large for a job file "
                               f"(at most {_MAX_JOB_BYTES >> 20} MiB)")
        with open(fd, "rb", closefd=False) as f:
            data = f.read(_MAX_JOB_BYTES + 1)
    except OSError as err:
        raise JobSpecError(f"{where}: cannot read the job file ({err.strerror or err})") from None
    finally:
        os.close(fd)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise JobSpecError(f"{where}: not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); "
                           f"save the job file as UTF-8") from None


class _DuplicateKeyError(yaml.YAMLError):
    """A mapping gives a key twice (YAML would silently keep the second)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (merge keys ``<<`` excepted)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[object, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: SafeConstructor refuses it below
                    continue
                if first is not key_node:
                    (l1, c1), (l2, c2) = ((n.start_mark.line + 1, n.start_mark.column + 1) for n in (first, key_node))
                    at = f"lines {l1} and {l2}" if l1 != l2 else f"line {l1} (columns {c1} and {c2})"
                    raise _DuplicateKeyError(f"duplicate key {key!r} at {at}; give each key once")
        return super().construct_mapping(node, deep=deep)


class _Loader:
    def __init__(self, path: Path, open_adapters: bool, check_writable: bool) -> None:
        self.path = path
        self.base = path.resolve().parent
        self.open_adapters = open_adapters
        self.check_writable = check_writable
        self.sources: Sources = {}

    def fail(self, key: str, message: str) -> JobSpecError:
        message = " ".join(str(message).split())
        return JobSpecError(f"{self.path}: {key}: {message}" if key else f"{self.path}: {message}")

    def job(self, raw: object) -> tuple[JobSpec, Sources]:
        if not isinstance(raw, Mapping):
            raise self.fail("", f"expected a mapping with keys {', '.join(_JOB_KEYS)}; got {_kind(raw)}")
        self.keys(raw, "", _JOB_KEYS)
        if "output_dir" not in raw:
            raise self.fail("output_dir", "missing; give the directory the merged adapters go to")
        output_dir = self.path_value(raw["output_dir"], "output_dir")
        settings = dict(  # the cheap checks first: adapters are opened below
            workers=self.integer(raw, "workers", None, minimum=1),
            gpus_per_worker=self.number(raw, "gpus_per_worker", None, minimum=0.0),
            cpus_per_worker=self.number(raw, "cpus_per_worker", None, minimum=0.0, strict=True),
            shard_by=self.choice(raw, "shard_by", "layer", SHARD_BY),
            max_in_flight_per_worker=self.integer(raw, "max_in_flight_per_worker", 2, minimum=1),
            retries=self.integer(raw, "retries", 3, minimum=0),
            placement_timeout_s=self.number(raw, "placement_timeout_s", 600.0, minimum=0.0, strict=True),
            stall_timeout_s=self.number(raw, "stall_timeout_s", 900.0, minimum=0.0, strict=True),
            analyze=self.analyze(raw.get("analyze")),
        )
        self.output_dir(output_dir)
        merges = [self.merge(entry, f"merges[{i}]") for i, entry in enumerate(self.seq(raw, "merges"))]
        for i, entry in enumerate(self.seq(raw, "sweeps")):
            merges.extend(self.sweep(entry, f"sweeps[{i}]"))
        if not merges:
            raise self.fail("merges", "no merges: give at least one entry under merges or sweeps")
        seen: dict[str, str] = {}
        for m in merges:
            if m.name in seen:
                raise self.fail(m.where, f"duplicate merge name {m.name!r} (also at {seen[m.name]}); "
                                         f"names must be unique")
            seen[m.name] = m.where
        self.outputs_apart_from_inputs(output_dir, merges)
        job = JobSpec(path=self.path, output_dir=output_dir, merges=tuple(merges), **settings)
        return job, self.sources

    # --- where the job writes -------------------------------------------------------------
    def output_dir(self, output_dir: Path) -> None:
        """``output_dir`` is a directory this user can write, or can be created; nothing is written."""
        if os.path.lexists(output_dir) and not output_dir.is_dir():
            raise self.fail("output_dir", f"{output_dir} exists and is not a directory; give a directory "
                                          f"(it is made if missing)")
        above = existing_ancestor(output_dir)
        if not above.is_dir():
            raise self.fail("output_dir", f"{output_dir} cannot be created: {above} is a file, not a directory")
        if self.check_writable:
            try:  # the honest test (root passes access checks; a read-only file system does not)
                with tempfile.TemporaryFile(dir=above):  # unnamed where the system allows: nothing is left
                    pass
            except OSError as err:
                made = "" if above == output_dir else f" (it would be made in {above})"
                raise self.fail("output_dir", f"{output_dir} is not writable{made}: {err.strerror or err}; "
                                              f"choose a directory you can write") from None

    def outputs_apart_from_inputs(self, output_dir: Path, merges: Sequence[MergeSpec]) -> None:
        """No merge's output directory (nor the job's .shards and manifest) is, contains or lies inside
        any adapter of the job: opened adapters by where their files really are (Hub ids: the local
        cache), others by the paths given."""
        if self.open_adapters:
            inputs: list[object] = list({src.name: src for group in self.sources.values() for src in group}.values())
        else:
            inputs = list(dict.fromkeys(a for m in merges for a in m.adapters))
        targets = [(output_dir / d, "output_dir", "the job's own directory") for d in _JOB_DIRS]
        targets += [(output_dir / m.name, m.where, f"merge {m.name!r}: output directory") for m in merges]
        for out, key, what in targets:
            try:
                check_output_not_input(out, inputs, where=what)
            except OutputOverlapError as err:
                raise self.fail(key, err) from None

    # --- one merge -------------------------------------------------------------------------
    def merge(self, raw: object, where: str, *, name: str | None = None) -> MergeSpec:
        if not isinstance(raw, Mapping):
            raise self.fail(where, f"expected a mapping with keys {', '.join(_MERGE_KEYS)}; got {_kind(raw)}")
        self.keys(raw, where, _MERGE_KEYS)
        name = self.name(raw, where) if name is None else name
        adapters, weights = self.adapters(raw, where)
        method = raw.get("method", "ta")
        try:
            methods.get_method(method)
        except ValueError as err:
            raise self.fail(f"{where}.method", err) from None
        params = raw.get("params") or {}
        if not isinstance(params, Mapping):
            raise self.fail(f"{where}.params", f"expected a mapping of name: value; got {_kind(params)}")
        try:
            methods.check_params(method, params)
        except ValueError as err:
            raise self.fail(f"{where}.params", err) from None
        out = self.dtype(raw, where, "dtype", None, what="output dtype")
        compute = self.dtype(raw, where, "compute_dtype", "float32", what="compute dtype")
        try:
            check_space(raw.get("space", "core"))
        except ValueError as err:
            raise self.fail(f"{where}.space", err) from None
        options = MergeOptions(method=method, space=raw.get("space", "core"), alpha=raw.get("alpha", 1.0),
                               weights=weights, params=dict(params), rank=raw.get("rank"),
                               seed=raw.get("seed", 0), compute_dtype=compute, device="cpu")
        try:
            options = options.checked(len(adapters))
        except ValueError as err:
            raise self.fail(where, err) from None
        sources = self.open(adapters, f"{where}.adapters")
        if sources:
            out_dtype = dtype_name(output_dtype(sources, out))
        else:  # adapters not opened (pipeline status)
            out_dtype = dtype_name(out) if out is not None else "auto"
        return MergeSpec(name=name, adapters=adapters, options=options, out_dtype=out_dtype, where=where)

    def name(self, raw: Mapping, where: str) -> str:
        name = raw.get("name")
        if name is None:
            raise self.fail(f"{where}.name", "missing; every merge needs a name (its output directory)")
        return self.check_name(name, f"{where}.name")

    def check_name(self, name: object, key: str) -> str:
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name.startswith("."):
            raise self.fail(key, f"bad merge name {name!r}: use letters, digits, '.', '_' and '-' "
                                 f"(not starting with '.'); it names a directory under output_dir")
        if name in RESERVED_NAMES:
            raise self.fail(key, f"merge name {name!r} is reserved (output_dir/{name} holds the job's records)")
        return name

    def adapters(self, raw: Mapping, where: str) -> tuple[tuple[str, ...], tuple[float, ...] | None]:
        key = f"{where}.adapters"
        entries = raw.get("adapters")
        if not isinstance(entries, list) or not entries:
            raise self.fail(key, "expected a non-empty list of adapter directories (or {path: ..., weight: ...})")
        specs, weights, weighted = [], [], False
        for i, entry in enumerate(entries):
            if isinstance(entry, Mapping):
                self.keys(entry, f"{key}[{i}]", ("path", "weight"))
                if "path" not in entry:
                    raise self.fail(f"{key}[{i}].path", "missing; give the adapter directory")
                weight = entry.get("weight", 1.0)
                if not _is_number(weight):
                    raise self.fail(f"{key}[{i}].weight", f"expected a finite number, got {weight!r}")
                weighted = weighted or "weight" in entry
                specs.append(self.adapter_spec(entry["path"], f"{key}[{i}].path"))
                weights.append(float(weight))
            else:
                specs.append(self.adapter_spec(entry, f"{key}[{i}]"))
                weights.append(1.0)
        return tuple(specs), tuple(weights) if weighted else None

    def adapter_spec(self, value: object, key: str) -> str:
        """An absolute directory, or a Hub id ``org/name[@rev]`` when no such directory exists
        next to the job file (the rule of ``coremerge merge``, with paths relative to the job file)."""
        path = self.path_value(value, key)
        if not path.exists() and not Path(str(value)).expanduser().is_absolute() and parse_hub_id(str(value)):
            return str(value)
        return str(path)

    def open(self, adapters: tuple[str, ...], key: str) -> list[AdapterSource]:
        if not self.open_adapters:
            return []
        if adapters not in self.sources:
            try:
                self.sources[adapters] = open_all(adapters)
            except (ValueError, OSError) as err:
                raise self.fail(key, err) from None
        return self.sources[adapters]

    # --- sweeps ----------------------------------------------------------------------------
    def sweep(self, raw: object, where: str) -> list[MergeSpec]:
        if not isinstance(raw, Mapping):
            raise self.fail(where, f"expected a mapping with keys {', '.join(_MERGE_KEYS)}; got {_kind(raw)}")
        self.keys(raw, where, _MERGE_KEYS)
        base = self.name(raw, where)
        axes: list[tuple[str, list[object]]] = []  # (key, values); "params.x" for a swept hyper-parameter
        for key in _SWEPT_KEYS:
            if isinstance(raw.get(key), list):
                axes.append((key, self.values(raw[key], f"{where}.{key}")))
        params = raw.get("params") or {}
        if not isinstance(params, Mapping):
            raise self.fail(f"{where}.params",
                            f"expected a mapping of name: value or name: [values]; got {_kind(params)}")
        for key, value in params.items():
            if isinstance(value, list):
                axes.append((f"params.{key}", self.values(value, f"{where}.params.{key}")))
        swept_methods = axes[0][1] if axes and axes[0][0] == "method" else [raw.get("method", "ta")]
        for method in swept_methods:
            try:
                methods.get_method(method)
            except ValueError as err:
                raise self.fail(f"{where}.method", err) from None
        for key in params:  # a parameter applies to the swept methods that have it; none at all is an error
            if not any(key in methods.get_method(m).hyperparams for m in swept_methods):
                valid = ", ".join(sorted({p for m in swept_methods for p in methods.get_method(m).hyperparams}))
                raise self.fail(f"{where}.params", f"unknown parameter {key!r} for method(s) "
                                                   f"{', '.join(map(str, swept_methods))}; expected: {valid or 'none'}")
        if any(key == "seed" for key, _ in axes) and not any(methods.get_method(m).random for m in swept_methods):
            listed = ", ".join(map(str, swept_methods))
            raise self.fail(f"{where}.seed", f"swept, but no method of the sweep ({listed}) is random "
                                             f"(dare, dare_ties): every seed would give the same merge")
        members, seen = [], set()
        for combo in itertools.product(*(values for _, values in axes)):
            chosen = dict(zip((key for key, _ in axes), combo))
            method = chosen.get("method", raw.get("method", "ta"))
            applied = {k: v for k, v in chosen.items() if _applies(k, method)}  # in axis order
            identity = tuple((k, type(v).__name__, repr(v)) for k, v in applied.items())
            if identity in seen:  # the same merge as an earlier member: a value its method does not take
                continue
            seen.add(identity)
            member = {k: v for k, v in raw.items() if k not in ("name", "params", *chosen)}
            member.update({k: v for k, v in applied.items() if not k.startswith("params.")})
            hyper = methods.get_method(method).hyperparams
            member["params"] = {k: applied.get(f"params.{k}", v) for k, v in params.items() if k in hyper}
            name = "-".join([base, *(_token(key, value) for key, value in applied.items())])
            name = self.check_name(re.sub(r"[^A-Za-z0-9._-]", "_", name), f"{where}.name")
            members.append(self.merge(member, f"{where} (member {name})", name=name))
        return members

    def values(self, values: list, key: str) -> list[object]:
        if not values:
            raise self.fail(key, "empty list: give at least one value to sweep")
        for i, value in enumerate(values):
            if any(type(v) is type(value) and v == value for v in values[:i]):
                raise self.fail(key, f"{value!r} is listed twice; give each value once")
        return values

    def analyze(self, value: object) -> float | None:
        """``analyze: true`` (SAR energy 0.95), ``analyze: {sar_energy: 0.9}``, or off (false, absent)."""
        if value is None or value is False:
            return None
        if value is True:
            return 0.95
        if isinstance(value, Mapping):
            self.keys(value, "analyze", ("sar_energy",))
            share = value.get("sar_energy", 0.95)
            if _is_number(share) and 0.0 < share <= 1.0:
                return float(share)
            raise self.fail("analyze.sar_energy", f"expected a share in (0, 1], got {share!r}")
        raise self.fail("analyze", f"expected true, false or a mapping {{sar_energy: 0.95}}; got {_kind(value)}")

    # --- scalars ---------------------------------------------------------------------------
    def keys(self, raw: Mapping, where: str, allowed: Sequence[str]) -> None:
        for key in raw:
            if key not in allowed:
                at = f"{where}.{key}" if where else str(key)
                raise self.fail(at, f"unknown key {key!r}; expected one of: {', '.join(allowed)}")

    def seq(self, raw: Mapping, key: str) -> list:
        value = raw.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(key, f"expected a list, got {_kind(value)}")
        return value

    def path_value(self, value: object, key: str) -> Path:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"expected a path, got {value!r}")
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base / path

    def integer(self, raw: Mapping, key: str, default: int | None, *, minimum: int) -> int | None:
        value = raw.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(key, f"expected an integer >= {minimum}, got {value!r}")
        return value

    def number(self, raw: Mapping, key: str, default: float | None, *, minimum: float,
               strict: bool = False) -> float | None:
        value = raw.get(key, default)
        if value is None:
            return None
        if not _is_number(value) or value < minimum or (strict and value == minimum):
            bound = ">" if strict else ">="
            raise self.fail(key, f"expected a number {bound} {minimum:g}, got {value!r}")
        return float(value)

    def dtype(self, raw: Mapping, where: str, key: str, default: str | None, *, what: str) -> torch.dtype | None:
        value = raw.get(key, default)
        if value is None:
            return None
        try:
            if not isinstance(value, str):
                raise ValueError(f"expected a dtype name, got {value!r}")
            return parse_dtype(value, what=what)
        except ValueError as err:
            raise self.fail(f"{where}.{key}", err) from None

    def choice(self, raw: Mapping, key: str, default: str, allowed: Sequence[str]) -> str:
        value = raw.get(key, default)
        if value not in allowed:
            raise self.fail(key, f"expected one of: {', '.join(allowed)}; got {value!r}")
        return value


def _applies(key: str, method: str) -> bool:
    """Whether the swept ``key`` ("params.x" for a hyper-parameter) changes a merge with ``method``:
    a hyper-parameter only for the methods that take it, a seed only for random methods."""
    if key.startswith("params."):
        return key.removeprefix("params.") in methods.get_method(method).hyperparams
    if key == "seed":
        return methods.get_method(method).random
    return True


def _token(key: str, value: object) -> str:
    text = repr(value) if isinstance(value, float) else str(value)
    key = key.removeprefix("params.")
    prefix = _NAME_TOKEN.get(key, "" if key in _SWEPT_KEYS else key)
    return f"{prefix}{text}"


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _kind(value: object) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"[:80]
