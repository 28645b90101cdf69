"""Keep the memory a CPU run frees inside the process (glibc's malloc), instead of handing it back to the system.

A training step allocates and frees gigabytes (the loss keeps every layer's activations for its backward). glibc
returns freed blocks at the top of its heap, and every block of more than its mmap threshold, to the system at once;
the next step then writes to fresh pages. On this project's 2-core virtual machine that cost 3.4 ms per MiB, against
0.3 ms for memory just freed, and a 16-trace LaDi-RL loss (forward and backward, after the first) took 30.6 s with
glibc's defaults and 14.6 s with the settings below (docs/benchmarks.md). glibc's own limits are raised here once
per process (`mallopt`): blocks up to 32 MiB come from the heap, and the heap is not trimmed, so the process holds its
peak memory until it ends. A setting the user made (`GLIBC_TUNABLES` with a `glibc.malloc.` tunable, or
`MALLOC_TRIM_THRESHOLD_` / `MALLOC_MMAP_THRESHOLD_`) is kept, and so is every run on a GPU or off glibc;
`TRL_LADI_KEEP_FREED_MEMORY=0` leaves glibc's defaults.
"""

import ctypes
import ctypes.util
import logging
import os

import torch

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's largest mmap threshold on 64-bit systems
NEVER_TRIM = -1  # `man mallopt`: -1 disables trimming

_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds for this process (once); returns whether they are raised now."""
    global _done
    if _done:
        return True
    environment = os.environ
    if (
        torch.cuda.is_available()
        or environment.get("TRL_LADI_KEEP_FREED_MEMORY", "1") == "0"
        or "glibc.malloc." in environment.get("GLIBC_TUNABLES", "")
        or "MALLOC_TRIM_THRESHOLD_" in environment
        or "MALLOC_MMAP_THRESHOLD_" in environment
    ):
        return False
    library = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(library)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
    if _done:
        logger.info("glibc malloc: blocks up to 32 MiB from the heap, the heap not trimmed (trl_ladi.cpu_memory).")
    return _done
