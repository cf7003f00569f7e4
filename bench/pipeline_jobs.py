"""Job files for the pipeline benchmarks (bench/RESULTS.md says how each is run).

    python bench/pipeline_jobs.py      # writes bench/.cache/jobs/*.yaml (and the adapter sets they use)

- 8b.yaml:          the 8-adapter Llama-3-8B merge (tsv), one merge, through the pipeline.
- batch16-w1/-w2:   16 merges of 4 Llama-3.2-1B adapters (8 methods x 2 alphas), 1 and 2 workers;
                    one adapter set, so its bases are shared as in a sweep.
- batch16-sets-w1/-w2: the same 16 merges, each of its own adapter set (the 4 adapters under other
                    paths, as separate16), so nothing is shared: an overnight batch of adapter sets.
- batch16-distinct-w1/-w2: the same 16 merges over 16 sets of 4 distinct adapters (64 adapter
                    files, 1.4 GB): as batch16-sets, but every input is a file of its own, read from
                    disk once, as in a real batch (batch16-sets' 16 sets are links to the same 4 files).
- sweep16.yaml:     one sweep of 16 (method, alpha) combinations over one adapter set (shared bases):
                    the 8 methods x alpha 0.5, 1.0.
- sweep16-grid.yaml: the issue's example sweep, 4 methods (ta, ties, tsv, iso_c) x 4 alphas (0.3 ... 0.9).
- separate16*.yaml: the same 16 merges as 16 separate jobs' worth of work (no sharing: each merge
                    names its adapters through a different path, so no bases are shared).
- 70b.yaml:         a Llama-3-70B-shaped 4-adapter merge (80 layers, r=16), for peak memory.
- 8b-gpu.yaml:      8b.yaml on one GPU worker (gpus_per_worker: 1), for a machine with a GPU.

    python bench/pipeline_jobs.py 8b       # only the 8B jobs (what bench/gpu/run.sh needs)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from workloads import CACHE, adapter_set

JOBS = CACHE / "jobs"
ALL_METHODS = ("ta", "ties", "dare", "dare_ties", "tsv", "iso_c", "iso_cts", "cart")
COMBOS = [(m, a) for m in ALL_METHODS for a in (0.5, 1.0)]  # every method, two alphas
GRID = [(m, a) for m in ("ta", "ties", "tsv", "iso_c") for a in (0.3, 0.5, 0.7, 0.9)]  # the example sweep


def merge_entry(name: str, adapters: list[Path], method: str, alpha: float) -> str:
    return f"  - name: {name}\n    adapters: [{', '.join(map(str, adapters))}]\n    method: {method}\n    alpha: {alpha}\n"


def write(name: str, text: str) -> Path:
    JOBS.mkdir(parents=True, exist_ok=True)
    path = JOBS / name
    path.write_text(text)
    print(path)
    return path


def main(which: list[str]) -> None:
    eight = adapter_set("llama3-8b")
    write("8b.yaml", f"output_dir: {JOBS / 'out-8b'}\nworkers: 1\nmerges:\n" + merge_entry("tsv", eight, "tsv", 1.0))
    write("8b-gpu.yaml", f"output_dir: {JOBS / 'out-8b-gpu'}\nworkers: 1\ngpus_per_worker: 1\nmerges:\n"
          + merge_entry("tsv", eight, "tsv", 1.0))
    if which == ["8b"]:
        return
    one_b = adapter_set("llama3.2-1b")
    batch = "".join(merge_entry(f"{m}-a{a}", one_b, m, a) for m, a in COMBOS)
    for workers in (1, 2):
        write(f"batch16-w{workers}.yaml", f"output_dir: {JOBS / f'out-batch-w{workers}'}\nworkers: {workers}\n"
                                          f"cpus_per_worker: 1\nmerges:\n{batch}")
    for tag, combos in (("", COMBOS), ("-grid", GRID)):
        methods = list(dict.fromkeys(m for m, _ in combos))
        alphas = list(dict.fromkeys(a for _, a in combos))
        write(f"sweep16{tag}.yaml", f"output_dir: {JOBS / f'out-sweep{tag}'}\nworkers: 1\nsweeps:\n  - name: s\n"
                                    f"    adapters: [{', '.join(map(str, one_b))}]\n"
                                    f"    method: [{', '.join(methods)}]\n    alpha: [{', '.join(map(str, alphas))}]\n")
        # Separate merges: the same adapters under 16 different symlinked names, so that no two
        # merges share an adapter set (what 16 independent `coremerge merge` runs would do).
        separate = ""
        for i, (m, a) in enumerate(combos):
            names = []
            for j, src in enumerate(one_b):
                link = CACHE / "links" / f"set{i}" / f"adapter-{j}"
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    os.symlink(src, link)
                names.append(link)
            separate += merge_entry(f"{m}-a{a}", names, m, a)
        write(f"separate16{tag}.yaml", f"output_dir: {JOBS / f'out-separate{tag}'}\nworkers: 1\nmerges:\n{separate}")
        if not tag:  # a batch of 16 adapter sets (what an overnight batch is): 1 and 2 workers
            for workers in (1, 2):
                write(f"batch16-sets-w{workers}.yaml", f"output_dir: {JOBS / f'out-batch-sets-w{workers}'}\n"
                                                       f"workers: {workers}\ncpus_per_worker: 1\nmerges:\n{separate}")
    distinct = adapter_set("llama3.2-1b", count=4 * len(COMBOS))
    batch = "".join(merge_entry(f"{m}-a{a}", distinct[4 * i:4 * i + 4], m, a) for i, (m, a) in enumerate(COMBOS))
    for workers in (1, 2):
        write(f"batch16-distinct-w{workers}.yaml", f"output_dir: {JOBS / f'out-batch-distinct-w{workers}'}\n"
                                                   f"workers: {workers}\ncpus_per_worker: 1\nmerges:\n{batch}")
    seventy = adapter_set("llama3-70b")
    write("70b.yaml", f"output_dir: {JOBS / 'out-70b'}\nworkers: 1\nmerges:\n" + merge_entry("ta", seventy, "ta", 1.0))


if __name__ == "__main__":
    args = sys.argv[1:]
    if args not in ([], ["8b"]):
        raise SystemExit(f"usage: python bench/pipeline_jobs.py [8b]; got {' '.join(args)}")
    main(args)
