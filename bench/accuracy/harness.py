"""Evaluation plumbing: encoded splits, adapters read through peft, the coremerge command.

- ``TaskData``: a task's prompts and gold classes, encoded once.
- ``WeightSwap``: the base model with ``W0 + alpha * ΔW`` written into its linear layers.
  ΔW comes from an adapter directory loaded with ``peft.PeftModel.from_pretrained`` (each
  LoRA layer's ``get_delta_weight``), so the weights evaluated are what peft makes of the
  files; the forward pass then costs what the base costs, whatever the adapter's rank.
- ``coremerge_merge``: the ``coremerge merge`` command, run exactly as a user would.
- ``relative_difference``: ‖ΔW_x − ΔW_y‖_F / ‖ΔW_y‖_F over all modules together.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from bench.accuracy.scoring import encode_prompt, label_ids, score_classes
from bench.accuracy.tasks import Example, Task


@dataclass(frozen=True)
class TaskData:
    task: Task
    labels: list[list[int]]  # token ids of each class's label
    prompts: dict[str, list[list[int]]]  # split -> prompt ids
    golds: dict[str, list[int]]  # split -> class index

    @classmethod
    def encode(cls, task: Task, tokenizer, splits: Mapping[str, Sequence[Example]]) -> "TaskData":
        return cls(task=task, labels=label_ids(tokenizer, task.labels),
                   prompts={s: [encode_prompt(tokenizer, task.template, e.text) for e in ex] for s, ex in splits.items()},
                   golds={s: [task.labels.index(e.label) for e in ex] for s, ex in splits.items()})

    def subset(self, split: str, n: int | None) -> tuple[list[list[int]], list[int]]:
        """The first ``n`` examples of ``split`` rounded down to whole rounds of classes (balanced)."""
        prompts, golds = self.prompts[split], self.golds[split]
        if n is not None:
            n = min(len(prompts), n - n % len(self.labels))
            prompts, golds = prompts[:n], golds[:n]
        return prompts, golds


def predict(model, data: TaskData, split: str, n: int | None, *, pad_id: int, max_tokens: int) -> list[int]:
    """The predicted class of each example of the split's first ``n``."""
    prompts, _ = data.subset(split, n)
    return score_classes(model, prompts, data.labels, pad_id=pad_id, max_tokens=max_tokens).argmax(-1).tolist()


def accuracy(predictions: Sequence[int], golds: Sequence[int]) -> float:
    return sum(p == g for p, g in zip(predictions, golds)) / len(golds)


class WeightSwap:
    """The base model, whose adapted linear weights are set to ``W0 + alpha * ΔW`` on demand."""

    def __init__(self, model):
        self.model = model
        self.pristine: dict[str, Tensor] = {}  # module name -> W0, for every module ever changed

    def read(self, adapter_dir: Path) -> dict[str, Tensor]:
        """ΔW of every LoRA module of ``adapter_dir``, as peft loads it; the model is left unchanged."""
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer

        self.reset()
        peft_model = PeftModel.from_pretrained(self.model, str(adapter_dir), adapter_name="bench")
        deltas = {}
        with torch.no_grad():
            for name, module in peft_model.base_model.model.named_modules():
                if isinstance(module, LoraLayer) and "bench" in module.lora_A:
                    deltas[name] = module.get_delta_weight("bench").detach().float().clone()  # (out, in)
        peft_model.base_model.unload()  # the base's own Linear layers back in place
        return deltas

    @torch.no_grad()
    def set(self, deltas: Mapping[str, Tensor], alpha: float = 1.0) -> None:
        """Weights = W0 + alpha * ΔW for the modules in ``deltas``, W0 everywhere else."""
        self.reset()
        for name, delta in deltas.items():
            weight = self.model.get_submodule(name).weight
            if name not in self.pristine:
                self.pristine[name] = weight.detach().clone()
            weight.add_(delta.to(weight.device, weight.dtype), alpha=alpha)

    @torch.no_grad()
    def reset(self) -> None:
        for name, w0 in self.pristine.items():
            self.model.get_submodule(name).weight.copy_(w0)


def relative_difference(x: Mapping[str, Tensor], y: Mapping[str, Tensor]) -> float:
    """‖x − y‖_F / ‖y‖_F over all modules (a module missing on one side counts as zero there)."""
    num = den = 0.0
    for name in set(x) | set(y):
        a, b = x.get(name), y.get(name)
        a = torch.zeros_like(b) if a is None else a.double()
        b = torch.zeros_like(a) if b is None else b.double()
        num += (a - b).pow(2).sum().item()
        den += b.pow(2).sum().item()
    return (num / den) ** 0.5 if den else float(num > 0)


def coremerge_merge(adapters: Sequence[Path], out: Path, *, method: str, space: str, alpha: float,
                    seed: int = 0, device: str = "cpu") -> dict[str, object]:
    """Run ``coremerge merge`` and return its merge_report.json, plus the command and its wall time."""
    cmd = ["coremerge", "merge", *map(str, adapters), "--out", str(out), "--method", method, "--space", space,
           "--alpha", repr(float(alpha)), "--seed", str(seed), "--device", device, "--force"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    report = json.loads((out / "merge_report.json").read_text())
    report["bench"] = {"command": " ".join(cmd), "wall_s": round(wall, 3)}
    return report


def merge_seconds(report: Mapping[str, object]) -> float:
    """The merge's own time, ``timings_s.merge`` of merge_report.json."""
    timings = report.get("timings_s")
    if not isinstance(timings, Mapping) or "merge" not in timings:
        raise KeyError(f"merge_report.json has no timings_s.merge (keys: {sorted(report)})")
    return float(timings["merge"])
