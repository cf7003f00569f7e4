"""Synthetic PEFT LoRA adapters of real model shapes, for the demo, benchmarks and tests.

The files are real PEFT adapter directories (adapter_config.json +
adapter_model.safetensors with PEFT's key names), filled with random factors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file


def llama_shapes(*, hidden: int, intermediate: int, layers: int, kv_dim: int | None = None,
                 modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj")) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of a Llama model's linear modules, by PEFT module name.

    Example:
        >>> llama_shapes(hidden=4096, intermediate=14336, layers=1, kv_dim=1024)["model.layers.0.self_attn.k_proj"]
        (1024, 4096)
    """
    kv = hidden if kv_dim is None else kv_dim
    per_layer = {
        "q_proj": ("self_attn", hidden, hidden), "k_proj": ("self_attn", kv, hidden),
        "v_proj": ("self_attn", kv, hidden), "o_proj": ("self_attn", hidden, hidden),
        "gate_proj": ("mlp", intermediate, hidden), "up_proj": ("mlp", intermediate, hidden),
        "down_proj": ("mlp", hidden, intermediate),
    }
    return {f"model.layers.{i}.{per_layer[m][0]}.{m}": per_layer[m][1:] for i in range(layers) for m in modules}


LLAMA3_8B = dict(hidden=4096, intermediate=14336, layers=32, kv_dim=1024)
LLAMA32_1B = dict(hidden=2048, intermediate=8192, layers=16, kv_dim=512)
LLAMA3_70B = dict(hidden=8192, intermediate=28672, layers=80, kv_dim=1024)
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_lora_adapter(path: str | os.PathLike, shapes: Mapping[str, tuple[int, int]], *, rank: int,
                       lora_alpha: float | None = None, use_rslora: bool = False, seed: int = 0,
                       dtype: torch.dtype = torch.float32, base_model: str | None = None,
                       b_std: float = 0.02) -> Path:
    """Write a random LoRA adapter in PEFT's format; returns its directory.

    A is drawn like PEFT's Kaiming-uniform init; B (zero at PEFT's init) is drawn with std
    ``b_std`` so that the adapter does something.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (m, n) in shapes.items():
        bound = 1.0 / n ** 0.5
        a = (torch.rand(rank, n, generator=generator) * 2 - 1) * bound  # (r, n)
        b = torch.randn(m, rank, generator=generator) * b_std  # (m, r)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.to(dtype).contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": lora_alpha if lora_alpha is not None else 2 * rank, "use_rslora": use_rslora,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in shapes}), "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path
