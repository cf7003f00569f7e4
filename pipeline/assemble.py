"""Assembly: a merge's shard files -> its PEFT adapter directory, through coremerge.merge.finish.

``finish`` is what ``coremerge merge`` calls too, so the adapter directory (tensors, config,
report) is the one the command writes for the same inputs; only the report's timings differ.
The modules stay in their shard files until the writer streams them, one at a time, into the
output: nobody holds a whole merged adapter (a 70B one is gigabytes).

Assembly runs on a worker (:class:`AssemblyWork`, :func:`run_assembly`) as soon as a merge's last
shard is recorded, so merges are written side by side and beside the shards still merging; the
driver only records the result.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from coremerge import peft_io
from coremerge.merge import finish, parse_dtype
from coremerge.peft_io import AdapterSource, known_sha256
from coremerge.types import StoredLowRank

from pipeline.config import MergeSpec
from pipeline.worker import InputVersion, hashed, shard_intact, stored_modules

WEIGHTS_NAME = peft_io.SAFETENSORS_NAME


def assemble(output_dir: Path, merge: MergeSpec, sources: Sequence[AdapterSource],
             rows: Sequence[Mapping[str, object]], *, key: str, owned: bool = False,
             device: str = "cpu") -> tuple[Path, str, str]:
    """Write ``output_dir/<merge>/`` from the merge's finished shards; returns (path, sha256 of the
    weights, :func:`output_digest` of the directory for ``key``).

    Every shard file (and the bases file it names) is checked against the sha256 recorded before
    it is used; a mismatch raises ValueError (the next run redoes that shard). Factored modules
    are multiplied out on ``device``. An existing directory is replaced only if it is a merged
    adapter coremerge wrote, or ``owned`` (the job's manifest says this job wrote it: it may be
    damaged).
    """
    started = time.perf_counter()
    merged: dict[str, StoredLowRank] = {}
    for row in rows:
        path = output_dir / str(row["path"])
        if not shard_intact(path, row["sha256"]):
            raise ValueError(f"shard file {path} (or the bases file it names) is missing or changed since it "
                             f"was written; run the job again to redo shard {row['shard']}")
        merged.update(stored_modules(path, device=device))
    modules = peft_io.union_modules(sources)
    missing = [m for m in modules if m not in merged]
    assert not missing, f"shards of {merge.name} lack modules {missing[:3]}"
    merged = {m: merged[m] for m in modules}  # the order coremerge merge uses
    devices = sorted({str(row["device"]) for row in rows if row.get("device")}) or ["cpu"]
    options = replace(merge.options, device=",".join(devices))  # the report says where it ran
    timings = {"merge": float(sum(float(row["seconds"] or 0.0) for row in rows)),
               "assemble": time.perf_counter() - started}
    out = output_dir / merge.name
    if not owns_output(out, known=owned):
        raise ValueError(f"{out} exists and is not an adapter coremerge wrote; refusing to replace it")
    out = Path(finish(out, sources, options, merged, out_dtype=parse_dtype(merge.out_dtype), timings=timings,
                      force=True, owned=lambda path: owns_output(path, known=owned)))
    digest = output_digest(out, key)
    if digest is None:
        raise ValueError(f"{out} disappeared right after it was written")
    return out, known_sha256(out / WEIGHTS_NAME), digest  # hashed as it was written


def output_digest(out: Path, key: str) -> str | None:
    """A digest of every file of the merged adapter directory ``out`` and of ``key`` (what the merge was
    made from); None if a file is missing or unreadable. The weights are hashed once per version of
    the file (:func:`known_sha256`), the config and the report, which are small, every time."""
    try:
        parts = [key, known_sha256(out / WEIGHTS_NAME)]
        for name in (peft_io.CONFIG_NAME, peft_io.REPORT_NAME):
            parts.append(hashlib.sha256((out / name).read_bytes()).hexdigest())
    except OSError:
        return None
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def owns_output(out: Path, *, known: bool) -> bool:
    """Whether a job may write the adapter directory ``out``: it does not exist, or it is an empty
    directory, or a directory this tool wrote: ``known`` (the job's manifest says so, even if the
    directory is damaged) or holding the ``merge_report.json`` coremerge writes. Never a symlink,
    never a file."""
    if not os.path.lexists(out):
        return True
    if out.is_symlink() or not out.is_dir():
        return False
    return known or not any(out.iterdir()) or peft_io.is_merged_adapter(out)


@dataclass(frozen=True)
class AssemblyWork:
    """What a worker needs to write one merge's adapter directory: paths, names and manifest rows."""

    output_dir: str
    merge: MergeSpec
    rows: tuple[Mapping[str, object], ...]  # the manifest rows of the merge's shards
    key: str  # what the merge is made from (Plan.output_keys): part of the directory's digest
    owned: bool = False  # the manifest says this job wrote the directory before (it may replace it)
    inputs: tuple[InputVersion, ...] = ()  # what the shards were merged from: the report names these

    @property
    def adapters(self) -> tuple[str, ...]:
        return self.merge.adapter_set


def run_assembly(work: AssemblyWork, sources: Sequence[AdapterSource], *, device: str = "cpu") -> list[dict[str, object]]:
    """Assemble ``work.merge``; one record: ``status`` done (with path, sha256, seconds) or failed (one-line error).

    Like :func:`pipeline.worker.run_shard`, it raises nothing for bad input: a missing or changed
    shard file fails the merge with a message saying to run the job again.
    """
    started = time.perf_counter()
    try:
        path, sha, digest = assemble(Path(work.output_dir), work.merge, sources, work.rows, key=work.key,
                                     owned=work.owned, device=device)
    except (ValueError, OSError) as err:
        text = " ".join(str(err).split()) or type(err).__name__
        return [{"merge": work.merge.name, "status": "failed", "error": f"assembly: {text}"}]
    return [{"merge": work.merge.name, "status": "done", "path": str(path), "sha256": sha, "digest": digest,
             "hashed": hashed([path / WEIGHTS_NAME]),
             "seconds": round(time.perf_counter() - started, 3), "worker": f"{socket.gethostname()}:{os.getpid()}"}]
