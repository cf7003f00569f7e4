"""Scoring adapters with lm-eval on one loaded base model: ``coremerge eval`` and the library under it.

The field's own tools do the work: transformers loads the base model once (placed by accelerate's
``device_map``: one device, or split over the GPUs it is given), PEFT attaches each adapter to that
same model object and detaches it afterwards, and lm-eval's Python API (``simple_evaluate`` on an
``HFLM`` wrapping the model) runs the tasks. Loading the model once is where the time goes when many
adapters are scored: an ``lm_eval --model_args pretrained=...,peft=...`` run per adapter loads it
every time. An adapter scored after others gets the scores a fresh process gives it (tested):
a deleted adapter leaves its modules computing ``base_layer(x)`` exactly.

Tasks are lm-eval task names or local task YAML files / folders of them (``--include_path``).
Everything is checked before a model is loaded: task names against lm-eval's index, task files
parse, adapters open and fit the base model's module shapes; each is one line (ValueError). A task
that fails while it runs is recorded as failed with its error; the other tasks go on.

Example:
    >>> evaluator = Evaluator(EvalSettings(base_model="HuggingFaceTB/SmolLM2-135M", tasks=("tasks/nli",)))  # doctest: +SKIP
    >>> scores = evaluator.score("merged/nli-tsv")                                                       # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

BASELINE = "base"  # the name of the base model's own scores (no adapter attached)
_TASK_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class EvalSettings:
    """Everything that decides the scores except the adapter: part of every score's fingerprint."""

    base_model: str  # a local model directory or a Hub id (read from the Hugging Face cache)
    tasks: tuple[str, ...]  # lm-eval task names, or local task YAML files / folders
    limit: int | None = None  # examples per task (None: all)
    batch_size: int = 8
    num_fewshot: int | None = None
    device: str = "cpu"  # cpu, cuda (accelerate places the model over every visible GPU) or cuda:N
    dtype: str = "float32"
    seed: int = 0

    def checked(self) -> "EvalSettings":
        if not self.tasks:
            raise ValueError("no tasks given; name lm-eval tasks or task YAML files with --tasks")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"limit must be a positive integer (examples per task), got {self.limit!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch size must be a positive integer, got {self.batch_size!r}")
        if self.num_fewshot is not None and (not isinstance(self.num_fewshot, int) or self.num_fewshot < 0):
            raise ValueError(f"num_fewshot must be an integer >= 0, got {self.num_fewshot!r}")
        if self.dtype not in ("float32", "bfloat16", "float16", "float64"):
            raise ValueError(f"unknown dtype {self.dtype!r}; expected float32, bfloat16, float16 or float64")
        from coremerge.merge import check_device

        check_device(self.device)
        return self

    def fingerprint(self, base_revision: str, task_files: Sequence[str] = ()) -> str:
        """sha256 of these settings, the base model's revision, the task files' contents and lm-eval's
        version: equal fingerprints, equal scores for the same adapter."""
        import lm_eval

        key = {"settings": asdict(self), "base_revision": base_revision, "task_files": list(task_files),
               "lm_eval": getattr(lm_eval, "__version__", "?")}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Score:
    """One metric of one task for one adapter (a row of the scores table)."""

    adapter: str  # its name (BASELINE for the base model alone)
    task: str
    split: str | None  # the split lm-eval scored (the task's test split, else its validation split)
    metric: str  # lm-eval's metric name, with ",filter" when the filter is not "none"
    value: float | None
    stderr: float | None
    n: int | None  # examples scored
    seconds: float  # wall time of the task for this adapter
    adapter_sha256: str | None  # of its weights file (None for the base model)
    base_revision: str
    settings: str  # EvalSettings.fingerprint
    error: str | None = None  # a task that failed: one line; value is None


# ----------------------------------------------------------------------------- tasks


class _TaskLoader(yaml.SafeLoader):
    """YAML as lm-eval's task files use it: ``!function module.name`` tags read as strings."""


_TaskLoader.add_multi_constructor("!", lambda loader, suffix, node: loader.construct_scalar(node)
                                  if isinstance(node, yaml.ScalarNode) else None)


@dataclass(frozen=True)
class TaskSet:
    """The tasks to run: lm-eval names, the folders lm-eval must also index, and the task files read."""

    names: tuple[str, ...]
    include_paths: tuple[str, ...]
    files: tuple[str, ...] = field(default=())  # "path sha256" of every local task file (for the fingerprint)


def resolve_tasks(specs: Sequence[str]) -> TaskSet:
    """Task names as given, and those of local task YAML files or folders (their ``task:`` keys).

    A file that does not parse, or names no task, is refused in one line (ValueError) naming it.
    """
    names: list[str] = []
    includes: list[str] = []
    files: list[str] = []
    for spec in specs:
        path = Path(spec).expanduser()
        local = path.suffix in _TASK_SUFFIXES or path.is_dir() or os.sep in spec
        if not local:
            names.append(spec)
            continue
        if not path.exists():
            raise ValueError(f"task file {spec}: does not exist; give an lm-eval task name or a task YAML file "
                             f"or folder")
        found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in _TASK_SUFFIXES)
        own = []
        for file in found:
            text = file.read_bytes()
            try:
                data = yaml.load(text, Loader=_TaskLoader)  # noqa: S506  (a SafeLoader)
            except yaml.YAMLError as err:
                raise ValueError(f"task file {file}: not valid YAML ({' '.join(str(err).split())})") from None
            task = data.get("task") if isinstance(data, dict) else None
            if isinstance(task, str):
                own.append(task)
            elif isinstance(data, dict) and isinstance(data.get("group"), str):
                own.append(data["group"])
            files.append(f"{file.resolve()} {hashlib.sha256(text).hexdigest()}")
        if not own:
            raise ValueError(f"task file {spec}: names no lm-eval task (expected a YAML mapping with a 'task:' key)")
        names.extend(own if path.is_dir() else own[:1])
        includes.append(str((path if path.is_dir() else path.parent).resolve()))
    return TaskSet(names=tuple(dict.fromkeys(names)), include_paths=tuple(dict.fromkeys(includes)), files=tuple(files))


def task_manager(tasks: TaskSet):
    """lm-eval's TaskManager for ``tasks``; unknown task names are refused in one line (ValueError).
    lm-eval's own tasks are indexed only when a task is named that the local files do not define."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=list(tasks.include_paths), include_defaults=False) if tasks.include_paths else None
    known = set(local.all_tasks) if local is not None else set()
    if all(name in known for name in tasks.names):
        return local
    manager = TaskManager(include_path=list(tasks.include_paths) or None)
    unknown = [name for name in tasks.names if name not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}: lm-eval {_lm_eval_version()} knows no task, group or tag of "
                         f"that name" + (f", nor do the task files in {', '.join(tasks.include_paths)}"
                                          if tasks.include_paths else ""))
    return manager


def _lm_eval_version() -> str:
    import lm_eval

    return getattr(lm_eval, "__version__", "?")


# ----------------------------------------------------------------------------- the base model


def base_revision(base_model: str) -> str:
    """What the base model is: the Hub commit of a cached Hub id (content-addressed), or for a local
    directory the sha256 of its config and weight files' contents."""
    path = Path(base_model).expanduser()
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.iterdir() if p.is_file() and
                           (p.name == "config.json" or p.suffix in (".safetensors", ".bin"))):
            digest.update(f"{file.name}\0".encode())
            digest.update(_file_sha256(file).encode())
        return "sha256:" + digest.hexdigest()
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(base_model, local_files_only=True))
    except Exception as err:  # noqa: BLE001  (not cached, bad id: one line)
        raise ValueError(f"base model {base_model!r}: not a local directory and not in the Hugging Face cache "
                         f"({type(err).__name__}); download it first, or give its directory") from None
    return "hub:" + snapshot.name  # snapshots/<commit>


def _file_sha256(path: Path) -> str:
    from coremerge.safetensors_file import known_sha256

    return known_sha256(path)


def check_fits(base, sources: Sequence[object]) -> None:
    """Every module of every adapter exists in ``base`` with the adapter's (out, in) shape (ValueError,
    one line naming the adapter and the module)."""
    modules = dict(base.named_modules())
    for src in sources:
        for name, spec in src.modules.items():
            module = modules.get(name)
            weight = getattr(module, "weight", None)
            if module is None or weight is None:
                raise ValueError(f"adapter {src.name!r}: module {name!r} is not in the base model "
                                 f"({type(base).__name__}); is this adapter for another model?")
            shape = tuple(weight.shape)
            fan_in_fan_out = type(module).__name__ == "Conv1D"  # transformers' Conv1D stores (in, out)
            want = (spec.in_features, spec.out_features) if fan_in_fan_out else (spec.out_features, spec.in_features)
            if shape != want:
                raise ValueError(f"adapter {src.name!r}: module {name!r} is {spec.out_features}x{spec.in_features} "
                                 f"(out x in), the base model's is {shape[0]}x{shape[1]}: the adapter was trained on "
                                 f"another model")


def base_skeleton(base_model: str):
    """The base model's modules without its weights (accelerate's ``init_empty_weights``: on the meta
    device, no memory), for :func:`check_fits` before anything is loaded."""
    import transformers
    from accelerate import init_empty_weights

    try:
        config = transformers.AutoConfig.from_pretrained(base_model)
    except (OSError, ValueError) as err:
        raise ValueError(f"base model {base_model!r}: no readable config ({' '.join(str(err).split())[:300]})") from None
    with init_empty_weights():
        return transformers.AutoModelForCausalLM.from_config(config)


def write_scores(path: str | os.PathLike, scores: Sequence[Score], *, settings: EvalSettings, revision: str,
                 fingerprint: str) -> Path:
    """``path`` as JSON (settings, base revision, fingerprint, one object per score), written whole:
    a temp file renamed into place."""
    path = Path(path)
    data = {"settings": asdict(settings), "base_revision": revision, "settings_fingerprint": fingerprint,
            "lm_eval": _lm_eval_version(), "scores": [asdict(s) for s in scores]}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------- scoring


class Evaluator:
    """One base model loaded once; adapters attached, scored and detached one after another."""

    def __init__(self, settings: EvalSettings, *, tasks: TaskSet | None = None) -> None:
        import torch
        import transformers

        self.settings = settings.checked()
        self.tasks = tasks or resolve_tasks(settings.tasks)
        self.manager = task_manager(self.tasks)
        self.revision = base_revision(settings.base_model)
        self.fingerprint = settings.fingerprint(self.revision, self.tasks.files)
        dtype = getattr(torch, settings.dtype)
        device_map = "auto" if settings.device == "cuda" else settings.device  # accelerate places it
        try:
            self.base = transformers.AutoModelForCausalLM.from_pretrained(settings.base_model, dtype=dtype,
                                                                           device_map=device_map)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(settings.base_model)
        except (OSError, ValueError) as err:
            raise ValueError(f"base model {settings.base_model!r}: cannot be loaded "
                             f"({' '.join(str(err).split())[:300]})") from None
        self.base.eval()
        self.model = self.base  # a PeftModel once an adapter has been attached
        self._seen = 0

    def score(self, adapter: str | os.PathLike | None, *, name: str | None = None,
              sha256: str | None = None) -> list[Score]:
        """Every task's metrics for ``adapter`` (a PEFT adapter directory), or for the base model alone
        (``adapter`` None). The adapter is detached afterwards, whatever happens."""
        import peft

        label = name or (BASELINE if adapter is None else Path(adapter).name)
        if adapter is None:
            if isinstance(self.model, peft.PeftModel):
                with self.model.disable_adapter():
                    return self._run(label, None)
            return self._run(label, None)
        slot = f"cm{self._seen}"  # a fresh PEFT adapter name each time: no state of an earlier one is reused
        self._seen += 1
        if isinstance(self.model, peft.PeftModel):
            self.model.load_adapter(str(adapter), adapter_name=slot, is_trainable=False)
        else:
            self.model = peft.PeftModel.from_pretrained(self.base, str(adapter), adapter_name=slot, is_trainable=False)
        try:
            self.model.set_adapter(slot)
            self.model.eval()
            return self._run(label, sha256)
        finally:
            self.model.delete_adapter(slot)

    def _run(self, label: str, sha256: str | None) -> list[Score]:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=self.model, tokenizer=self.tokenizer, batch_size=self.settings.batch_size)
        scores: list[Score] = []
        for task in self.tasks.names:
            started = time.perf_counter()
            common = dict(adapter=label, task=task, adapter_sha256=sha256, base_revision=self.revision,
                          settings=self.fingerprint)
            try:
                result = simple_evaluate(model=lm, tasks=[task], limit=self.settings.limit,
                                         num_fewshot=self.settings.num_fewshot, task_manager=self.manager,
                                         log_samples=False, random_seed=self.settings.seed,
                                         numpy_random_seed=self.settings.seed, torch_random_seed=self.settings.seed,
                                         fewshot_random_seed=self.settings.seed, verbosity=None)
            except Exception as err:  # noqa: BLE001  (a failed task is recorded; the others go on)
                scores.append(Score(split=None, metric="", value=None, stderr=None, n=None,
                                    seconds=round(time.perf_counter() - started, 3),
                                    error=f"{type(err).__name__}: {' '.join(str(err).split())[:500]}", **common))
                continue
            seconds = round(time.perf_counter() - started, 3)
            scores.extend(_scores_of(result, seconds, common))
        return scores


def _scores_of(result: dict, seconds: float, common: dict) -> list[Score]:
    """The rows of one ``simple_evaluate`` result: every metric of every task it reports."""
    rows = []
    for task, metrics in result["results"].items():
        config = result.get("configs", {}).get(task, {})
        split = config.get("test_split") or config.get("validation_split")
        n = result.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            stderr = float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
            rows.append(Score(**{**common, "task": task}, split=split,
                              metric=metric if filt == "none" else f"{metric},{filt}", value=float(value),
                              stderr=stderr, n=n, seconds=seconds))
    return rows


def format_table(scores: Sequence[Score]) -> list[str]:
    """The scores as aligned text lines (what ``coremerge eval`` prints)."""
    header = ["adapter", "task", "split", "metric", "value", "± stderr", "n", "s"]
    rows = []
    for s in scores:
        if s.error is not None:
            rows.append([s.adapter, s.task, "-", "-", "failed", "-", "-", f"{s.seconds:.1f}"])
            continue
        rows.append([s.adapter, s.task, s.split or "-", s.metric, f"{s.value:.4f}",
                     "-" if s.stderr is None else f"{s.stderr:.4f}", "-" if s.n is None else str(s.n),
                     f"{s.seconds:.1f}"])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    errors = [f"{s.adapter} {s.task}: {s.error}" for s in scores if s.error is not None]
    return lines + ([""] + ["failed:"] + errors if errors else [])
