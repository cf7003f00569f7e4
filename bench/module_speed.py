"""Per-module merge time: every method in core space against the same method in full space.

    python bench/module_speed.py [--modules q_proj,down_proj] [--tasks 8] [--rank 16] [--full-repeats 1]

One Llama-3-8B module, T adapters of rank r (random factors, scale folded), float32 on
the CPU (or --device cuda). Core space: bases + cores + merge + LoRA factors (no m x n
matrix). Full space: dense ΔW_t, the method on m x n matrices, and the SVD that turns the
merged ΔW back into LoRA factors (what PEFT's *_svd merges do to write an adapter); the
method step alone is reported too. Median of repeats; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from coremerge import methods
from coremerge.spaces import merge_module, module_generator
from coremerge.synthetic import LLAMA3_8B, llama_shapes
from coremerge.types import LoraFactors

SHAPES = {name.rsplit(".", 1)[-1]: shape for name, shape in
          llama_shapes(**{**LLAMA3_8B, "layers": 1}, modules=("q_proj", "k_proj", "gate_proj", "down_proj")).items()}


def factors(m: int, n: int, tasks: int, rank: int, device: str) -> list[LoraFactors]:
    g = torch.Generator().manual_seed(0)
    return [LoraFactors(a=(torch.rand(rank, n, generator=g) * 2 - 1).div(n ** 0.5).to(device),
                        b=(torch.randn(m, rank, generator=g) * 0.02).to(device)) for _ in range(tasks)]


def timed(fn, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modules", default="q_proj")
    parser.add_argument("--methods", default=",".join(methods.METHODS))
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--core-repeats", type=int, default=5)
    parser.add_argument("--full-repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, "
          f"T={args.tasks}, r={args.rank}, float32\n")
    print("| module (m x n) | method | core s | full s (to LoRA) | full s (method only) | full/core |")
    print("|---|---|---|---|---|---|")
    for module in args.modules.split(","):
        m, n = SHAPES[module]
        fs = factors(m, n, args.tasks, args.rank, args.device)
        for method in args.methods.split(","):
            gen = (lambda: module_generator(0, module))
            merge_module(fs, method=method, space="core", generator=gen())  # warm-up (library init)
            core = timed(lambda: merge_module(fs, method=method, space="core", generator=gen()),
                         args.core_repeats, args.device)
            full = timed(lambda: merge_module(fs, method=method, space="full", generator=gen()),
                         args.full_repeats, args.device)
            deltas = torch.stack([f.delta() for f in fs])  # (T, m, n)
            method_only = timed(lambda: methods.apply(method, deltas, generator=gen()), args.full_repeats,
                                args.device)
            del deltas
            print(f"| {module} ({m}x{n}) | {method} | {core:.4f} | {full:.2f} | {method_only:.2f} | "
                  f"{full / core:,.0f}x |", flush=True)


if __name__ == "__main__":
    main()
