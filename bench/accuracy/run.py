"""The benchmark, stage by stage: set-up, data, adapters, references, checks, merges, report.

Every stage leaves its result on disk under the cache (data JSONL, adapters, one JSON per
evaluated model), keyed by the settings that decide it, so a second run (or a run after a
crash) redoes only what is missing. See README.md beside this file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import random
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
METHODS = ("ta", "ties", "dare", "dare_ties", "tsv", "iso_c", "iso_cts", "cart")
SPACES = ("core", "full", "knots")
KNOTS_METHODS = ("ta", "ties", "tsv")
PAPER_GRID = (0.1, 0.3, 0.5, 0.7, 0.9)  # the paper's NLI grid
EXTENSION = (1.2, 1.5, 2.0, 3.0)  # tried only while the validation score keeps improving past 0.9
# The adapters merged alone as a check: the rsLoRA one and the one that also targets up/down.
ALONE_CHECK = ("langid", "wn_supersense")


@dataclass(frozen=True)
class Settings:
    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    spaces: tuple[str, ...]
    val_per_task: int
    test_per_task: int
    alphas: tuple[float, ...]
    early_stop: bool
    steps: int
    batch_size: int
    lr: float
    seed: int
    device: str
    max_tokens: int
    threads: int = 1
    setup_only: bool = False
    report_only: bool = False
    retime: int = 0
    cache: str = str(HERE / ".cache")

    def key(self, *fields: str) -> str:
        """A short fingerprint of the named settings (what a cached result depends on)."""
        chosen = {name: getattr(self, name) for name in fields}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:10]


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="all", help="comma-separated tasks (default: all eight)")
    p.add_argument("--methods", default="all", help=f"comma-separated: {','.join(METHODS)} (default: all)")
    p.add_argument("--spaces", default="core,full,knots",
                   help=f"comma-separated spaces; knots runs only for {','.join(KNOTS_METHODS)}")
    p.add_argument("--val-per-task", type=int, default=16, help="validation examples per task for the alpha search")
    p.add_argument("--test-per-task", type=int, default=40, help="test examples per task")
    p.add_argument("--alphas", default=",".join(map(str, PAPER_GRID + EXTENSION)), help="alpha grid, ascending")
    p.add_argument("--no-early-stop", action="store_true", help="evaluate every alpha of the grid")
    p.add_argument("--full", action="store_true",
                   help="the issue's full protocol: 200 val / 400 test per task, alpha grid 0.1..1.0, no early "
                        "stop (hours on 2 CPU cores; minutes on a GPU)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per adapter")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: with the 2 cores shared, two threads stall on OpenMP barriers "
                        "at every small op; measured 5-18 s a training step against 2 s with one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-tokens", type=int, default=1024, help="padded tokens per evaluation batch")
    p.add_argument("--setup-only", action="store_true", help="download and build the data, then stop")
    p.add_argument("--retime", type=int, default=0, metavar="N",
                   help="time every finished merge again, N runs each, and keep the median as its merge time "
                        "(for a quiet machine: the times taken during the run share the CPU with nothing else only "
                        "if nothing else runs)")
    p.add_argument("--cache", default=str(HERE / ".cache"),
                   help="where downloads, data, adapters and results are kept (default: bench/accuracy/.cache); "
                        "an empty directory measures a cold start")
    p.add_argument("--report-only", action="store_true",
                   help="write the report from the cached results only; pairs not yet run are listed as missing")
    args = p.parse_args(argv)
    from bench.accuracy.tasks import TASKS

    tasks = tuple(TASKS) if args.tasks == "all" else tuple(args.tasks.split(","))
    methods = METHODS if args.methods == "all" else tuple(args.methods.split(","))
    spaces = tuple(args.spaces.split(","))
    for name, given, valid in (("task", tasks, TASKS), ("method", methods, METHODS), ("space", spaces, SPACES)):
        bad = [x for x in given if x not in valid]
        if bad:
            p.error(f"unknown {name}(s) {bad}; expected some of {list(valid)}")
    alphas = tuple(float(a) for a in args.alphas.split(","))
    val, test, early = args.val_per_task, args.test_per_task, not args.no_early_stop
    if args.full:
        val, test, early, alphas = 200, 400, False, tuple(round(0.1 * i, 1) for i in range(1, 11))
    settings = Settings(tasks=tasks, methods=methods, spaces=spaces, val_per_task=val, test_per_task=test,
                        alphas=alphas, early_stop=early, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        seed=args.seed, device=args.device, max_tokens=args.max_tokens,
                        threads=args.threads, setup_only=args.setup_only,
                        report_only=args.report_only, retime=args.retime,
                        cache=str(Path(args.cache).expanduser().resolve()))
    return settings


def combos(settings: Settings) -> list[tuple[str, str]]:
    return [(m, s) for m in settings.methods for s in settings.spaces if s != "knots" or m in KNOTS_METHODS]


class Clock:
    """Wall time per stage, printed as it goes and kept for the report."""

    def __init__(self):
        self.start = time.perf_counter()
        self.stages: dict[str, float] = {}

    def stage(self, name: str, fn: Callable[[], object]) -> object:
        t = time.perf_counter()
        print(f"[{self.elapsed():6.0f}s] {name} ...", flush=True)
        out = fn()
        self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - t
        print(f"[{self.elapsed():6.0f}s] {name} done in {time.perf_counter() - t:.0f}s", flush=True)
        return out

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _cached(path: Path, compute: Callable[[], dict]) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    from bench.accuracy import fetch, harness, report
    from bench.accuracy.model import load_base
    from bench.accuracy.tasks import TASKS, build_task_data
    from bench.accuracy.train import TrainConfig, train_adapter

    settings = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft on transformers 5
    cache = Path(settings.cache)
    clock = Clock()
    torch.set_num_threads(settings.threads)
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)

    # Stages that fill the cache record their cold-start time there, so a later run (which finds
    # them cached) still reports what a cold start costs.
    cold_path = cache / "cold_start_s.json"
    cold = json.loads(cold_path.read_text()) if cold_path.exists() else {}
    empty_cache = not (cache / "src" / "MANIFEST.json").exists()  # this run is a cold start

    def cold_stage(name: str, is_cached: bool, fn: Callable[[], object]) -> object:
        out = clock.stage(name, fn)
        if not is_cached:
            cold[name] = round(clock.stages[name], 1)
            cold_path.write_text(json.dumps(cold, indent=1))
        return out

    manifest = cold_stage("set-up (registry downloads)", (cache / "src" / "MANIFEST.json").exists(),
                          lambda: fetch.fetch(cache))
    splits = cold_stage("data", all((cache / "data" / t / "test.jsonl").exists() for t in settings.tasks),
                        lambda: {t: build_task_data(TASKS[t], cache / "src", cache / "data", seed=settings.seed)
                                 for t in settings.tasks})
    if settings.setup_only:
        return 0
    model, tokenizer = cold_stage("base model", (cache / "model" / "model.safetensors").exists(),
                                  lambda: load_base(cache / "src" / fetch.GGUF_FILE, cache / "model",
                                                    device=settings.device))
    pad = tokenizer.pad_token_id
    data = {t: harness.TaskData.encode(TASKS[t], tokenizer, splits[t]) for t in settings.tasks}

    # --- adapters (cached per task and training settings) ---
    train_key = settings.key("steps", "batch_size", "lr", "seed")
    adapter_dirs = {t: cache / "adapters" / f"{t}-{train_key}" for t in settings.tasks}
    train_config = TrainConfig(steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr)

    def train_all():
        logs = {}
        for t in settings.tasks:
            if not (adapter_dirs[t] / "adapter_config.json").exists():
                prompts, golds = data[t].prompts["train"], data[t].golds["train"]
                logs[t] = clock.stage(f"train {t}", lambda: train_adapter(
                    model, t, prompts, [data[t].labels[g] for g in golds], adapter_dirs[t], pad_id=pad,
                    config=train_config, seed=settings.seed))
            logs[t] = json.loads((adapter_dirs[t] / "train_log.json").read_text())
        return logs

    train_logs = clock.stage("adapters", train_all)
    swap = harness.WeightSwap(model)
    results_dir = cache / "results" / settings.key("tasks", "val_per_task", "test_per_task", "steps", "batch_size",
                                                   "lr", "seed", "alphas", "early_stop")

    throughput = {"tokens": 0, "seconds": 0.0}

    def evaluate(deltas, alpha, split, tasks=settings.tasks) -> dict[str, list[int]]:
        swap.set(deltas, alpha)
        n = settings.val_per_task if split == "val" else settings.test_per_task
        start = time.perf_counter()
        out = {t: harness.predict(model, data[t], split, n, pad_id=pad, max_tokens=settings.max_tokens)
               for t in tasks}
        throughput["seconds"] += time.perf_counter() - start
        throughput["tokens"] += sum(len(p) for t in tasks for p in data[t].subset(split, n)[0])
        return out

    def golds(split: str) -> dict[str, list[int]]:
        n = settings.val_per_task if split == "val" else settings.test_per_task
        return {t: data[t].subset(split, n)[1] for t in settings.tasks}

    def accs(preds: dict[str, list[int]], split: str) -> dict[str, float]:
        g = golds(split)
        return {t: harness.accuracy(preds[t], g[t]) for t in preds}

    # --- references: the base zero-shot, each adapter on its own task ---
    def references():
        base = evaluate({}, 0.0, "test")
        own = {"val": {}, "test": {}}
        for t in settings.tasks:
            deltas = swap.read(adapter_dirs[t])
            for split in ("val", "test"):
                own[split].update(evaluate(deltas, 1.0, split, tasks=(t,)))
        return {"base_test": base, "own_val": own["val"], "own_test": own["test"]}

    refs = clock.stage("references (zero-shot base, each adapter on its task)",
                       lambda: _cached(results_dir / "references.json", references))
    own_val, own_test = accs(refs["own_val"], "val"), accs(refs["own_test"], "test")

    def normalized(a: dict[str, float], own: dict[str, float]) -> float:
        return 100.0 * sum(a[t] / own[t] for t in a) / len(a)

    # --- check: one adapter merged alone gives that adapter's weights and accuracy ---
    def single_checks():
        out = {}
        for t in [t for t in ALONE_CHECK if t in settings.tasks] or list(settings.tasks[:1]):
            merged = cache / "merges" / f"alone-{t}"
            harness.coremerge_merge([adapter_dirs[t]], merged, method="ta", space="core", alpha=1.0,
                                    seed=settings.seed, device=settings.device)
            merged_deltas = swap.read(merged)
            diff = harness.relative_difference(merged_deltas, swap.read(adapter_dirs[t]))
            preds = evaluate(merged_deltas, 1.0, "test", tasks=(t,))[t]
            out[t] = {"relative_difference": diff, "accuracy": harness.accuracy(preds, golds("test")[t]),
                      "adapter_accuracy": own_test[t],
                      "same_predictions": sum(a == b for a, b in zip(preds, refs["own_test"][t])) / len(preds)}
        return out

    alone = clock.stage("check: each adapter merged alone",
                        lambda: _cached(results_dir / "check_alone.json", single_checks))

    # --- every method and space: alpha on validation, then test ---
    adapters = [adapter_dirs[t] for t in settings.tasks]

    def run_combo(method: str, space: str) -> dict:
        start = time.perf_counter()
        unit = cache / "merges" / f"{method}-{space}-a1"
        rep1 = harness.coremerge_merge(adapters, unit, method=method, space=space, alpha=1.0, seed=settings.seed,
                                       device=settings.device)
        deltas = swap.read(unit)
        search = []
        best = None
        for alpha in settings.alphas:
            a = accs(evaluate(deltas, alpha, "val"), "val")
            score = normalized(a, own_val)
            search.append({"alpha": alpha, "val_normalized": score, "val_accuracy": a})
            print(f"    {method}/{space} alpha={alpha:g}: val normalized {score:.1f}", flush=True)
            if best is None or score > best["val_normalized"]:
                best = search[-1]
            elif settings.early_stop and score < best["val_normalized"]:
                break
        alpha = best["alpha"]
        final = cache / "merges" / f"{method}-{space}"
        rep = harness.coremerge_merge(adapters, final, method=method, space=space, alpha=alpha, seed=settings.seed,
                                      device=settings.device)
        final_deltas = swap.read(final)
        linear = harness.relative_difference(final_deltas, {k: alpha * v for k, v in deltas.items()})
        preds = evaluate(final_deltas, 1.0, "test")
        test = accs(preds, "test")
        return {"method": method, "space": space, "alpha": alpha, "search": search,
                "merge_s": min(harness.merge_seconds(rep), harness.merge_seconds(rep1)),
                "merge_s_runs": [harness.merge_seconds(rep1), harness.merge_seconds(rep)],
                "command": rep["bench"]["command"], "cli_wall_s": rep["bench"]["wall_s"],
                "alpha_linearity": linear, "test_accuracy": test, "test_predictions": preds,
                "normalized": {t: 100.0 * test[t] / own_test[t] for t in test},
                "mean_normalized": normalized(test, own_test), "seconds": time.perf_counter() - start}

    results = {}
    missing = []
    for method, space in combos(settings):
        if settings.report_only and not (results_dir / f"{method}-{space}.json").exists():
            missing.append(f"{method}/{space}")
            continue
        results[f"{method}/{space}"] = clock.stage(
            f"merge {method} in {space} space", lambda: _cached(results_dir / f"{method}-{space}.json",
                                                                lambda: run_combo(method, space)))

    # --- optional: the merge times again, N runs each, median kept (a quiet machine's figures) ---
    if settings.retime:
        def retime():
            for key, result in results.items():
                method, space = key.split("/")
                runs = [harness.merge_seconds(harness.coremerge_merge(
                    adapters, cache / "merges" / "retime", method=method, space=space, alpha=result["alpha"],
                    seed=settings.seed, device=settings.device)) for _ in range(settings.retime)]
                result.update(merge_s=statistics.median(runs), merge_s_runs=runs,
                              merge_s_note=f"median of {len(runs)} runs with --retime at {time.strftime('%Y-%m-%d %H:%M')}")
                path = results_dir / f"{method}-{space}.json"
                path.with_suffix(".tmp").write_text(json.dumps(result, indent=1))
                path.with_suffix(".tmp").replace(path)
                print(f"    {key}: merge {statistics.median(runs):.3f} s (runs {[round(r, 3) for r in runs]})", flush=True)
        clock.stage(f"time every merge again ({settings.retime} runs each)", retime)

    # --- check: ta in core and in full space give the same weights and accuracy ---
    ta_check = None
    if {"ta/core", "ta/full"} <= set(results):
        def ta_same():
            diff = harness.relative_difference(swap.read(cache / "merges" / "ta-core-a1"),
                                               swap.read(cache / "merges" / "ta-full-a1"))
            pc, pf = results["ta/core"]["test_predictions"], results["ta/full"]["test_predictions"]
            same = sum(a == b for t in pc for a, b in zip(pc[t], pf[t])) / sum(len(pc[t]) for t in pc)
            return {"relative_difference": diff, "same_predictions": same,
                    "alpha_core": results["ta/core"]["alpha"], "alpha_full": results["ta/full"]["alpha"]}
        ta_check = clock.stage("check: ta core vs full", lambda: _cached(results_dir / "check_ta.json", ta_same))
    swap.reset()

    stages, total = dict(clock.stages), clock.elapsed()
    if empty_cache and not missing:  # the whole benchmark, measured from nothing: the budget's figure
        cold["whole run from an empty cache"] = round(total, 1)
        cold_path.write_text(json.dumps(cold, indent=1))
    previous = cache / "summary.json"
    if settings.report_only and previous.exists():  # keep the times of the run that computed the results
        before = json.loads(previous.read_text())
        stages = {k: max(v, stages.get(k, 0.0)) for k, v in before["stages_s"].items()} | {
            k: v for k, v in stages.items() if k not in before["stages_s"]}
        total = max(total, before["total_s"])
        if not throughput["seconds"] and before.get("eval_tokens_per_s"):
            throughput.update(tokens=before["eval_tokens_per_s"], seconds=1.0)
    summary = {
        "settings": asdict(settings), "manifest": manifest, "machine": machine(settings.device),
        "stages_s": stages, "total_s": total, "train": train_logs, "cold_start_s": cold,
        "eval_tokens_per_s": throughput["tokens"] / throughput["seconds"] if throughput["seconds"] else None,
        "zero_shot_test": accs(refs["base_test"], "test"), "own_test": own_test, "own_val": own_val,
        "golds_test": golds("test"), "own_test_predictions": refs["own_test"],
        "check_alone": alone, "check_ta": ta_check, "results": results, "missing": missing,
    }
    (cache / "summary.json").write_text(json.dumps(summary, indent=1))
    report.write(summary, BENCH / "ACCURACY.md", BENCH / "accuracy.png")
    print(f"[{clock.elapsed():6.0f}s] wrote {BENCH / 'ACCURACY.md'} and {BENCH / 'accuracy.png'}", flush=True)
    return 0


def machine(device: str) -> str:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, torch threads: {torch.get_num_threads()}"
    if device.startswith("cuda"):
        text += f", GPU {torch.cuda.get_device_name()}"
    return text
