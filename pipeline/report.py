"""``python -m pipeline report job.yaml``: write ``output_dir/report/`` from what the job recorded.

With ``analyze: true`` in the job file, every shard of a core-space merge carries its analysis in its
shard file's header (rows of :mod:`coremerge.analyze`, computed by the worker from the cores it built
for the merge). The report gathers them from the shards this job file's fingerprints name, whose
files prove their sha256, and writes what ``coremerge analyze`` writes: analysis.parquet (one row
per merge, module and task), summary.md, analysis.json and the plots. A merge whose shards are not
all done and analysed is reported as far as it goes, and the summary says what is missing.
Nothing else is written; the report directory is replaced whole (it is the job's own).
"""

from __future__ import annotations

import sys
from pathlib import Path

from coremerge import analyze
from coremerge.merge import dtype_name

from pipeline.manifest import ManifestDamaged, read_manifest
from pipeline.plan import analyze_of
from pipeline.status import EXIT_BAD_SPEC, EXIT_FAILED, EXIT_OK, _load
from pipeline.worker import _NOT_A_SHARD, _shard_info, shard_file_name, shard_intact

REPORT_DIR = "report"


def report_file(path: Path) -> int:
    """``python -m pipeline report job.yaml``; exit 0 when the report was written, 1 when there is
    nothing to report (or it could not be written), 2 for a bad job file."""
    loaded = _load(path)
    if loaded is None:
        return EXIT_BAD_SPEC
    job, sources, plan = loaded
    if job.analyze is None:
        print(f"pipeline: error: {job.path}: nothing to report: the job file does not say `analyze: true`",
              file=sys.stderr)
        return EXIT_FAILED
    try:
        table = read_manifest(job.output_dir)
    except ManifestDamaged as err:
        print(f"pipeline: error: the manifest is damaged ({err}); run the job again to rebuild it", file=sys.stderr)
        return EXIT_FAILED
    recorded = {(r["merge"], r["shard"]): r for r in (table.to_pylist() if table is not None else [])}
    rows: list[dict[str, object]] = []
    merges, notes = [], []
    for merge in job.merges:
        if analyze_of(job, merge) is None:
            notes.append(f"{merge.name}: not analysed (a {merge.options.space}-space merge; the analysis "
                         f"comes from core-space merges' cores)")
            continue
        units = plan.units_of(merge.name)
        found = 0
        for unit in units:
            row = recorded.get((unit.merge, unit.shard))
            if row is None or row["status"] != "done" or row["fingerprint"] != unit.fingerprint or not row["sha256"]:
                continue
            shard = job.output_dir / unit.directory / shard_file_name(unit.shard, str(row["sha256"]))
            try:
                info = _shard_info(shard) if shard_intact(shard, row["sha256"]) else None
            except _NOT_A_SHARD:
                info = None
            if info is None or not _rows_ok(info.get("analysis")):
                continue
            rows.extend(info["analysis"])
            found += 1
        if found:
            merges.append(analyze.MergeSpec(label=merge.name, options=merge.options))
        if found < len(units):
            notes.append(f"{merge.name}: {found} of {len(units)} shards analysed; the others are not done yet "
                         f"(`python -m pipeline status {job.path}`)")
    if not rows:
        print(f"pipeline: error: nothing analysed yet in {job.output_dir}: run the job "
              f"(python -m pipeline run {job.path})" + ("; " + "; ".join(notes) if notes else ""), file=sys.stderr)
        return EXIT_FAILED
    opened = {src.name: src for group in sources.values() for src in group}
    tasks = list(dict.fromkeys(str(r["task"]) for r in rows))
    adapters = []
    for group in sources.values():
        for name, src in zip(analyze.task_names(group), group):
            if name in tasks and all(a["name"] != name for a in adapters):
                adapters.append({"name": name, "path": str(src.path), "peft_type": src.peft_type,
                                 "modules": len(src.modules), "ranks": sorted({s.rank for s in src.modules.values()}),
                                 "dtype": dtype_name(src.dtype)})
    result = analyze.Analysis(tasks=tuple(tasks), adapters=tuple(adapters), merges=tuple(merges),
                              sar_energy=job.analyze, full=False, rows=tuple(_nan_back(r) for r in rows),
                              seconds=None, notes=tuple(notes))
    out = job.output_dir / REPORT_DIR
    try:
        analyze.write_report(result, out, force=True, inputs=list(opened.values()))
    except (ValueError, OSError) as err:
        print(f"pipeline: error: cannot write {out}: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(f"wrote {out}: {len(merges)} merges analysed ({len(rows)} rows)")
    for note in notes:
        print(f"note: {note}")
    return EXIT_OK


_ROW_KEYS = ("module", "layer", "kind", "merge", "task", "sar", "merged_sv", "truncation_error", "task_sv", "k")


def _rows_ok(rows: object) -> bool:
    """Whether a shard file's analysis is a list of rows as the worker writes them (a shard file proves
    its bytes by their sha256, but not that an older or foreign writer put the same fields in)."""
    return isinstance(rows, list) and all(isinstance(r, dict) and all(k in r for k in _ROW_KEYS) for r in rows)


def _nan_back(row: dict[str, object]) -> dict[str, object]:
    """A row as the worker stored it (strict JSON: None for NaN) with its float figures NaN again."""
    return {key: (float("nan") if value is None and key in ("sar",) else value) for key, value in row.items()}
