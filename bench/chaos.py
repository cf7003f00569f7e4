"""Chaos run of the pipeline (issue 12's acceptance; not in CI: it takes ~15 minutes on 2 cores).

    python bench/chaos.py [--kills 20] [--actor-kills 5] [--seed 0] [--dir bench/.cache/chaos]

A batch with sweeps (4 adapters, 3 adapter sets, 20 merges, 32 layers) runs once without
interruption (the reference), then again into another output_dir through a storm of events in a
random order:

- ``kills`` driver kills: SIGKILL of the driver's process group (the driver and the local Ray it
  started) at a random moment of a run;
- ``actor-kills``: SIGKILL of one merge actor's process in the middle of a run (Ray restarts it,
  the driver retries its shard), then of the driver a few seconds later (so that work is left);
- one input (adapter a: 14 of the 20 merges read it) replaced mid-run by another valid adapter
  (atomic rename), then put back after the run: those merges fail in that run and are merged
  again from the original later (their shards are not counted as redone);
- one full disk: as root, output_dir is a small tmpfs and a filler file takes its free space in the
  middle of a run (removed after it); otherwise the run's driver gets a file-size limit
  (RLIMIT_FSIZE, EFBIG instead of ENOSPC).

Every disturbed run slows each task by ``--delay`` seconds (the COREMERGE_TEST_SHARD_DELAY test hook:
96 tasks, ~75 s of work with 2 workers), so that the events land while work is left. Then one final run. Checked, and printed as a Markdown table for bench/RESULTS.md: every merged
adapter byte-identical to the reference's (the report but for its timings), no shard that a
manifest ever recorded done redone for the same fingerprint, no leftover temp file, no Ray process
left after any event, no traceback in any run's output.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "pipeline"))  # marked_pids / stop_marked: one copy, the tests'

from pipeline_helpers import marked_pids, stop_marked  # noqa: E402

from coremerge.synthetic import ALL_LINEAR, llama_shapes, write_lora_adapter  # noqa: E402

MODEL = dict(hidden=512, intermediate=1376, layers=32, kv_dim=128)


def write_inputs(root: Path) -> list[Path]:
    attn, every = llama_shapes(**MODEL), llama_shapes(**MODEL, modules=ALL_LINEAR)
    return [write_lora_adapter(root / "a", attn, rank=8, lora_alpha=16, seed=1),
            write_lora_adapter(root / "b", every, rank=16, lora_alpha=16, use_rslora=True, seed=2),
            write_lora_adapter(root / "c", attn, rank=8, lora_alpha=8, seed=3, dtype=__import__("torch").bfloat16),
            write_lora_adapter(root / "d", every, rank=4, lora_alpha=8, seed=4)]


def job_text(output_dir: Path, adapters: list[Path]) -> str:
    a, b, c, d = (str(p) for p in adapters)
    return f"""output_dir: {output_dir}
workers: 2
gpus_per_worker: 0
cpus_per_worker: 1
merges:
  - {{name: m-tsv, adapters: [{a}, {b}, {c}], method: tsv, alpha: 0.9}}
  - {{name: m-ties, adapters: [{a}, {b}], method: ties, params: {{density: 0.5}}}}
sweeps:
  - name: s4
    adapters: [{a}, {b}, {c}, {d}]
    method: [ta, ties, tsv, iso_c]
    alpha: [0.5, 0.7, 1.0]
  - name: s3
    adapters: [{b}, {c}, {d}]
    method: [dare_ties, cart, iso_cts]
    alpha: [0.6, 1.0]
    seed: 5
"""


def merges_of(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if (p / "adapter_config.json").is_file())


def read_rows(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(out / "manifest" / "manifest.parquet").to_pylist()
    except Exception:  # noqa: BLE001  missing or mid-replace: nothing to learn this time
        return []


class Chaos:
    def __init__(self, root: Path, seed: int) -> None:
        self.root, self.rng = root, random.Random(seed)
        self.events: list[dict] = []
        self.done_seen: dict[tuple[str, str, str], float | None] = {}  # (merge, shard, fingerprint) -> finished_at
        self.redone: list[tuple] = []
        self.tracebacks: list[str] = []
        self.ray_left: list[str] = []

    def start(self, job: Path, *, limit_fsize: int | None = None, delay: float = 0.0) -> tuple[subprocess.Popen, str, str]:
        marker = uuid.uuid4().hex
        ray_tmp = tempfile.mkdtemp(prefix="chaos", dir="/tmp")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(COREMERGE_TEST_RUN=marker, RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0",
                   COREMERGE_LOG_INTERVAL="2")
        if delay:  # the test hook: each task sleeps after its first module, so that a run lasts long enough
            env["COREMERGE_TEST_SHARD_DELAY"] = str(delay)

        def limits() -> None:
            if limit_fsize is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit_fsize, limit_fsize))

        log = open(self.root / "logs" / f"run-{len(self.events):02d}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(job)], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=limits)
        proc.log_path = log.name  # type: ignore[attr-defined]
        log.close()
        return proc, marker, ray_tmp

    def finish(self, proc: subprocess.Popen, marker: str, ray_tmp: str, event: dict, out: Path) -> None:
        try:
            event["exit"] = proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            event["exit"] = "hung (killed after 600 s)"
            proc.wait()
        deadline = time.monotonic() + 30
        while marked_pids(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = stop_marked(marker, grace=2)
        if left:
            self.ray_left.append(f"{event['kind']} #{len(self.events)}: {len(left)} processes")
        shutil.rmtree(ray_tmp, ignore_errors=True)
        text = Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]
        if "Traceback" in text:
            self.tracebacks.append(f"{event['kind']} #{len(self.events)}: {proc.log_path}")
        event["done_rows"] = self.observe(out)
        self.events.append(event)
        print(f"{len(self.events):3d} {event['kind']:<13} exit {event['exit']!s:<5} at {event.get('at', '-')!s:>6} s, "
              f"{event['done_rows']} shards done", flush=True)

    def observe(self, out: Path) -> int:
        """Record the done rows of the saved manifest; note any shard redone for the same fingerprint."""
        rows = read_rows(out)
        for row in rows:
            if row["status"] != "done":
                continue
            key = (row["merge"], row["shard"], row["fingerprint"])
            if key in self.done_seen and self.done_seen[key] != row["finished_at"] and row["finished_at"] is not None:
                self.redone.append(key)
            self.done_seen.setdefault(key, row["finished_at"])
        return sum(1 for r in rows if r["status"] == "done")


def actor_pids(marker: str) -> list[int]:
    pids = []
    for pid in marked_pids(marker):
        try:
            if b"MergeWorker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            continue
    return pids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--actor-kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--delay", type=float, default=1.5, help="seconds each task sleeps in the disturbed runs "
                        "(COREMERGE_TEST_SHARD_DELAY): the merging itself takes ~15 s here, too short to hit")
    parser.add_argument("--dir", type=Path, default=REPO / "bench" / ".cache" / "chaos")
    args = parser.parse_args()
    root = args.dir.resolve()
    mounted = False
    if root.exists():
        subprocess.run(["umount", str(root / "out")], capture_output=True)
        shutil.rmtree(root)
    (root / "logs").mkdir(parents=True)
    adapters = write_inputs(root / "adapters")
    ref_job, job = root / "ref.yaml", root / "job.yaml"
    ref_job.write_text(job_text(root / "ref", adapters))
    job.write_text(job_text(root / "out", adapters))
    chaos = Chaos(root, args.seed)

    started = time.monotonic()
    proc, marker, tmp = chaos.start(ref_job)
    chaos.finish(proc, marker, tmp, {"kind": "reference"}, root / "ref")
    reference_s = time.monotonic() - started
    if chaos.events[0]["exit"] != 0:
        print("the reference run failed: see", root / "logs")
        return 1
    chaos.done_seen.clear()
    size = sum(p.stat().st_size for p in (root / "ref").rglob("*") if p.is_file())
    (root / "out").mkdir()
    if os.geteuid() == 0:
        mb = max(64, 4 * size // 2**20)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", str(root / "out")],
                                 capture_output=True).returncode == 0

    plan = ["kill"] * args.kills + ["actor"] * args.actor_kills
    chaos.rng.shuffle(plan)
    for kind in ("replace", "disk-full"):  # in the first half: while there is work to disturb
        plan.insert(chaos.rng.randrange(1, len(plan) // 2), kind)
    replaced = adapters[0] / "adapter_model.safetensors"
    original = root / "a-original.safetensors"
    shutil.copy2(replaced, original)
    other = write_lora_adapter(root / "a-other", llama_shapes(**MODEL), rank=8, lora_alpha=16,
                               seed=99) / "adapter_model.safetensors"
    try:
        for kind in plan:
            event: dict[str, object] = {"kind": kind}
            filler = root / "out" / "filler"
            limit = None if mounted or kind != "disk-full" else 64 * 1024  # no tmpfs: writes past 64 KiB fail
            done_before = chaos.observe(root / "out")
            proc, marker, tmp = chaos.start(job, limit_fsize=limit, delay=args.delay)
            t0 = time.monotonic()
            if kind == "kill":
                at = chaos.rng.uniform(4.0, 14.0)  # start-up is ~6 s: at start-up, planning or mid-merge
                while time.monotonic() - t0 < at and proc.poll() is None:
                    time.sleep(0.05)
                event["at"] = round(time.monotonic() - t0, 1)
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    event["note"] = "ended before the kill"
            elif kind == "actor":
                deadline = time.monotonic() + 60
                while not actor_pids(marker) and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.1)
                time.sleep(chaos.rng.uniform(0.0, 2.0))
                victims = actor_pids(marker)
                if victims:
                    os.kill(chaos.rng.choice(victims), signal.SIGKILL)
                    event["at"] = round(time.monotonic() - t0, 1)
                    time.sleep(chaos.rng.uniform(3.0, 8.0))  # the retry runs; then the driver goes too
                    if proc.poll() is None:
                        os.killpg(proc.pid, signal.SIGKILL)
                else:
                    event["note"] = "no actor to kill (nothing to merge)"
            elif kind == "replace":
                while chaos.observe(root / "out") <= done_before and proc.poll() is None and time.monotonic() - t0 < 120:
                    time.sleep(0.2)
                time.sleep(chaos.rng.uniform(0.5, 2.0))
                staged = replaced.with_name(".staged")
                shutil.copy2(other, staged)
                os.replace(staged, replaced)  # as a `cp new && mv` of a retrained adapter does
                event["at"] = round(time.monotonic() - t0, 1)
            elif kind == "disk-full" and mounted:
                time.sleep(chaos.rng.uniform(6.0, 20.0))
                free = shutil.disk_usage(root / "out").free
                with open(filler, "wb") as f:
                    try:
                        f.write(b"\0" * max(0, free - 4096))
                    except OSError:
                        pass
                event["at"] = round(time.monotonic() - t0, 1)
            chaos.finish(proc, marker, tmp, event, root / "out")
            if kind == "replace":
                shutil.copy2(original, replaced.with_name(".staged"))
                os.replace(replaced.with_name(".staged"), replaced)  # the original content again
                for key in [k for k in chaos.done_seen if not k[0].startswith("s3")]:  # read adapter a
                    del chaos.done_seen[key]  # merged again from the original later: not a redo
            filler.unlink(missing_ok=True)
        proc, marker, tmp = chaos.start(job)
        chaos.finish(proc, marker, tmp, {"kind": "final"}, root / "out")
        result = check(root, chaos)
    finally:
        if mounted:
            keep = root / "out-final"
            shutil.copytree(root / "out", keep, dirs_exist_ok=True, symlinks=True)
            subprocess.run(["umount", str(root / "out")], capture_output=True)
    report(chaos, result, reference_s, mounted, args)
    return 0 if result["ok"] else 1


def check(root: Path, chaos: Chaos) -> dict:
    ref, out = root / "ref", root / "out"
    merges = merges_of(ref)
    different = []
    for merge in merges:
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            a, b = ref / merge / name, out / merge / name
            if not b.is_file() or a.read_bytes() != b.read_bytes():
                different.append(f"{merge}/{name}")
        reports = []
        for d in (ref, out):
            try:
                report = json.loads((d / merge / "merge_report.json").read_text())
                report.pop("timings_s", None)
                report["inputs"] = [{k: v for k, v in i.items()} for i in report["inputs"]]
            except (OSError, ValueError):
                report = None
            reports.append(report)
        if reports[0] != reports[1]:
            different.append(f"{merge}/merge_report.json")
    leftovers = [str(p.relative_to(out)) for p in out.rglob("*")
                 if p.name.endswith(".tmp") or ".tmp-" in p.name or ".old-" in p.name or p.name == "filler"]
    rows = read_rows(out)
    ok = (not different and not leftovers and not chaos.redone and not chaos.tracebacks and not chaos.ray_left
          and chaos.events[-1]["exit"] == 0 and merges_of(out) == merges and {r["status"] for r in rows} == {"done"})
    return {"ok": ok, "merges": len(merges), "different": different, "leftovers": leftovers, "rows": len(rows)}


def report(chaos: Chaos, result: dict, reference_s: float, mounted: bool, args: argparse.Namespace) -> None:
    kinds = [e for e in chaos.events[1:-1]]
    exits: dict[str, dict[str, int]] = {}
    for e in kinds:
        exits.setdefault(str(e["kind"]), {}).setdefault(str(e["exit"]), 0)
        exits[str(e["kind"])][str(e["exit"])] += 1
    print()
    print(f"| chaos run (seed {args.seed}) | figure |")
    print("|---|---|")
    print(f"| reference run (uninterrupted) | {reference_s:.1f} s, {result['merges']} merges, {result['rows']} shards |")
    for kind, counts in exits.items():
        print(f"| {kind} events: exit statuses | {', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))} |")
    before, mid = 0, 0
    for e in chaos.events[1:-1]:
        if e["kind"] == "kill" and e["exit"] == -9 and 0 < e["done_rows"] - before:
            mid += 1
        before = e["done_rows"]
    print(f"| kills that landed after this run had finished shards, with work left | {mid} |")
    print(f"| disk full by | {'a tmpfs filled mid-run' if mounted else 'RLIMIT_FSIZE (EFBIG)'} |")
    print(f"| final run | exit {chaos.events[-1]['exit']} |")
    print(f"| merged adapters byte-identical to the reference | {result['merges'] - len(result['different'])}"
          f"/{result['merges']}{' (' + ', '.join(result['different'][:4]) + ')' if result['different'] else ''} |")
    print(f"| shards recorded done, then redone for the same fingerprint | {len(chaos.redone)} |")
    print(f"| leftover temp files | {len(result['leftovers'])} |")
    print(f"| runs that left Ray processes | {len(chaos.ray_left)} |")
    print(f"| runs with a traceback in their output | {len(chaos.tracebacks)} |")
    print(f"| verdict | {'PASS' if result['ok'] else 'FAIL'} |")


if __name__ == "__main__":
    sys.exit(main())
