"""Where one layer of the 8B tsv merge spends its time on a device: torch's profiler over the 7
modules of one layer (read, bases, cores, method, LoRA factors), after a warm-up layer.

    python bench/gpu/profile_layer.py --device cuda     # bench/gpu/run.sh runs it on the GPU machine

Prints the operators that take the most time (self time on the device, then on the CPU) and the
wall time per layer, so that a session with a GPU sees in one run what to make faster.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for workloads

from coremerge.merge import MergeOptions, merge_module_of, open_all  # noqa: E402
from coremerge.peft_io import union_modules  # noqa: E402
from workloads import adapter_set  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--method", default="tsv")
    parser.add_argument("--rows", type=int, default=25, help="operators to list")
    args = parser.parse_args()
    sources = open_all(adapter_set("llama3-8b"))
    options = MergeOptions(method=args.method, device=args.device).checked(len(sources))
    modules = union_modules(sources)
    layer = [[m for m in modules if f".layers.{i}." in m] for i in (0, 1, 2)]

    def run(mods: list[str]) -> None:
        for module in mods:
            merge_module_of(sources, module, options).to(dtype=torch.bfloat16, device="cpu")
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    run(layer[0])  # warm-up: library and kernel initialisation
    started = time.perf_counter()
    run(layer[1])
    plain = time.perf_counter() - started
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        run(layer[2])
    print(f"device {args.device}, method {args.method}, {len(sources)} adapters: one layer "
          f"({len(layer[1])} modules) in {plain * 1000:.1f} ms without the profiler")
    key = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))
    if args.device.startswith("cuda"):
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
