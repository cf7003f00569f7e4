"""Benchmark workloads: synthetic PEFT adapter sets of real model shapes.

    python bench/workloads.py llama3-8b      # 8 adapters, r=16, q/k/v/o/gate/up/down, bf16 (~85 MB each)

Written once under bench/.cache/<name>/ and reused; random factors are what a merge's
speed and memory depend on (shapes, ranks, dtype), not what the adapters learned.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from coremerge.synthetic import ALL_LINEAR, LLAMA3_8B, LLAMA3_70B, LLAMA32_1B, llama_shapes, write_lora_adapter

CACHE = Path(__file__).resolve().parent / ".cache"

WORKLOADS = {
    # name: (model shape, adapters, rank)
    "llama3-8b": (LLAMA3_8B, 8, 16),
    "llama3.2-1b": (LLAMA32_1B, 4, 16),
    "llama3-70b": (LLAMA3_70B, 4, 16),
}


def adapter_set(name: str, *, count: int | None = None) -> list[Path]:
    """The adapter directories of a workload, written on first use."""
    model, default_count, rank = WORKLOADS[name]
    count = default_count if count is None else count
    shapes = llama_shapes(**model, modules=ALL_LINEAR)
    paths = []
    for i in range(count):
        path = CACHE / name / f"adapter-{i}"
        if not (path / "adapter_config.json").exists():
            print(f"writing {path}", file=sys.stderr)
            write_lora_adapter(path, shapes, rank=rank, lora_alpha=2 * rank, seed=1000 + i, dtype=torch.bfloat16,
                               base_model=f"synthetic/{name}")
        paths.append(path)
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("--count", type=int)
    args = parser.parse_args()
    for p in adapter_set(args.workload, count=args.count):
        print(p)
