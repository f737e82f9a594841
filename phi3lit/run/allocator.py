"""Keep freed memory in the process instead of handing it back to the OS (glibc, Linux).

glibc's malloc serves large requests (>= 128 KiB, a threshold it raises up to 32 MiB as it sees frees) with a
fresh `mmap` and returns them with `munmap` on free. A training step allocates and frees the same large
buffers every step (activations, logits, gradients: tens to hundreds of MB), so each step pays to fault in
and zero fresh pages again; on a small CPU machine that is a large share of the step (measured in
experiments/bench/RESULTS.md). Setting `M_MMAP_MAX=0` serves everything from the heap, and a high
`M_TRIM_THRESHOLD` keeps the freed top of the heap mapped, so the next step reuses warm pages. This is what
`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...` do from the environment; `mallopt` does it from inside the
process, at start-up, for every phi3lit run. The cost is that RSS stays at the high-water mark.

`allocator: system` (CLI/YAML) leaves malloc alone. CUDA memory is not affected: PyTorch caches it already.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
KEEP_BYTES = 2**31 - 1  # mallopt takes an int: freed heap tops below ~2 GiB stay mapped


def keep_freed_memory() -> bool:
    """Apply the two `mallopt` settings; False where there is no glibc (macOS, musl) or it refuses."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
