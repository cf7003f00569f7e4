"""Keep freed memory in the process: a merge allocates and frees the same large tensors module after module.

glibc's malloc gives the top of its heap back to the kernel as soon as more than a little is free
there, and serves allocations above a (moving) threshold with fresh ``mmap`` calls, so every
module's tensors fault in new zeroed pages: 16 merges of 1B adapters on one CPU took 1.6M page
faults and 4.6 s of kernel time, against 0.11M and 2.0 s with the settings below (25.2 -> 21.3 s
wall; bench/RESULTS.md). The price: the process keeps the memory of its peak until it exits,
which is what a merge worker or a ``coremerge merge`` process wants anyway.

Only processes that coremerge itself runs call :func:`keep_freed_memory` (the command line and
the pipeline's workers); importing the library changes nothing in yours.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit: blocks below it come from the heap
_TRIM_THRESHOLD = (1 << 31) - 1  # never give the heap's top back (an int: the largest mallopt takes)


def keep_freed_memory() -> bool:
    """Set this process's glibc malloc to reuse freed memory instead of returning it; True if it took.

    A no-op (False) where the C library is not glibc (macOS, musl).
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    log.debug("malloc keeps freed memory: %s", ok)
    return ok
