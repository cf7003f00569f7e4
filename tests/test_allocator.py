"""keep_freed_memory: a process that merges module after module stops faulting in fresh pages."""

from __future__ import annotations

import subprocess
import sys

import pytest

from coremerge.allocator import keep_freed_memory

SCRIPT = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from coremerge.allocator import keep_freed_memory
    assert keep_freed_memory()
from coremerge.spaces import merge_module
from coremerge.types import LoraFactors
g = torch.Generator().manual_seed(0)
fs = [LoraFactors(a=torch.randn(16, 2048, generator=g), b=torch.randn(8192, 16, generator=g)) for _ in range(4)]
merge_module(fs, method="tsv")  # the first merge may fault in what the process keeps from then on
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    out = merge_module(fs, method="tsv")
    del out
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120,
                          env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_repeated_merges_reuse_freed_memory():
    if not keep_freed_memory():
        pytest.skip("this C library has no mallopt (not glibc)")
    default, kept = page_faults("default"), page_faults("keep")
    # 10 merges of an 8192 x 2048 module, 4 adapters r=16: ~29k page faults by default, ~2k kept
    assert kept * 4 < default, (kept, default)
