"""One LoRA adapter per task, trained with peft on the frozen base and saved with save_pretrained.

The adapters are deliberately not all alike (ranks, scaling, target modules), as adapters
collected from different people are; see ``ADAPTERS``. Training: AdamW on the LoRA factors
only, the loss is -log p(gold label tokens | prompt) (the scoring's continuation
log-likelihood), a fixed number of steps with a short warm-up and linear decay, everything
seeded from (seed, task). The saved adapter is cached: a second run reuses it.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.accuracy.scoring import continuation_logprob
from bench.accuracy.tasks import stable_seed

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")

# task -> LoRA settings. Most r=8, lora_alpha=16; two at r=16; one rsLoRA; one also on up/down.
ADAPTERS: dict[str, dict[str, object]] = {
    "spam": {"r": 8, "lora_alpha": 16},
    "brown_genre": {"r": 16, "lora_alpha": 32},
    "brown_pos": {"r": 8, "lora_alpha": 16},
    "fortune_topic": {"r": 16, "lora_alpha": 32},
    "langid": {"r": 8, "lora_alpha": 16, "use_rslora": True},
    "wn_supersense": {"r": 8, "lora_alpha": 16, "target_modules": [*ATTENTION, "up_proj", "down_proj"]},
    "wn_verbsense": {"r": 8, "lora_alpha": 16},
    "word_sentiment": {"r": 8, "lora_alpha": 16},
}


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 80
    batch_size: int = 8
    lr: float = 2e-3
    warmup: int = 5
    weight_decay: float = 0.0


def lora_config(task: str):
    from peft import LoraConfig

    settings = dict(ADAPTERS[task])
    settings.setdefault("target_modules", list(ATTENTION))
    return LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, bias="none", **settings)


def train_adapter(model, task: str, prompts: Sequence[Sequence[int]], golds: Sequence[Sequence[int]], out_dir: Path,
                  *, pad_id: int, config: TrainConfig = TrainConfig(), seed: int = 0) -> dict[str, object]:
    """Train the task's LoRA on (prompt ids, gold label ids) pairs; save it to ``out_dir``.

    ``model`` is the frozen base; it is wrapped for training and handed back unchanged (the
    LoRA layers are removed again). Returns the training log (losses, seconds).
    """
    from peft import get_peft_model

    task_seed = stable_seed(seed, "train", task) % (2 ** 31)
    torch.manual_seed(task_seed)  # LoRA's A initialisation
    rng = random.Random(task_seed)  # batch order
    peft_model = get_peft_model(model, lora_config(task))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / config.warmup, (config.steps - step) / (config.steps - config.warmup)))
    order: list[int] = []
    losses = []
    start = time.perf_counter()
    peft_model.train()
    for step in range(config.steps):
        if len(order) < config.batch_size:
            more = list(range(len(prompts)))
            rng.shuffle(more)
            order += more
        batch, order = order[:config.batch_size], order[config.batch_size:]
        logp = continuation_logprob(peft_model, [prompts[i] for i in batch], [golds[i] for i in batch],
                                    pad_id=pad_id)  # (B,)
        loss = -logp.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(round(loss.item(), 4))
    seconds = time.perf_counter() - start
    peft_model.eval()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    peft_model.save_pretrained(tmp)
    log = {"task": task, "lora": {k: v for k, v in ADAPTERS[task].items()}, "steps": config.steps,
           "batch_size": config.batch_size, "lr": config.lr, "seconds": round(seconds, 1), "losses": losses}
    (tmp / "train_log.json").write_text(json.dumps(log, indent=1))
    tmp.replace(out_dir)
    peft_model.unload()  # the base's own Linear layers back in place, weights untouched
    return log
