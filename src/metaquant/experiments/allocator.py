"""The command line's memory allocator settings: glibc told to reuse the memory a step frees instead of giving
it back to the system, so that the next step's large tensors do not pay the kernel's page faults again.

glibc's ``malloc`` serves every allocation over 32 MB with a fresh memory mapping and unmaps it when it is
freed. LSTMFC's step allocates its new state and its kept gates (hundreds of MB for ResNet20) at every step, so
each step zeroes fresh pages: ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>`` removes that cost
(docs/performance.md, *Freed memory given back to the system*). ``mallopt`` sets the same two parameters from
inside the process. The price: the process keeps its peak memory until it exits, which a training command
reaches at every step anyway. The library never does this; it is the program's business.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

__all__ = ["reuse_freed_memory"]

logger = logging.getLogger(__name__)

# glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: Free memory at the top of the heap beyond this is given back to the system (glibc: 128 kB, raised as large
#: blocks are freed): the largest value mallopt takes, 2 GiB.
_TRIM_THRESHOLD = 2**31 - 1
#: The environment variables that set the two parameters (or the threshold they depend on): where the user set
#: one, their choice stands. Others (``MALLOC_ARENA_MAX``, common in containers) do not interfere.
USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
USER_TUNABLES = ("glibc.malloc.mmap_max", "glibc.malloc.trim_threshold", "glibc.malloc.mmap_threshold")


def _user_settings() -> list[str]:
    """The settings by which the user already chose what ``reuse_freed_memory`` would set: theirs stands."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return [name for name in USER_SETTINGS if name in os.environ] + [t for t in USER_TUNABLES if t in tunables]


def reuse_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (no memory mappings, no trimming); True when it was set.

    Nothing is changed, and False returned, off glibc (macOS, musl, Windows) or when the environment already sets
    these parameters (``USER_SETTINGS``, ``USER_TUNABLES``). With another allocator preloaded (jemalloc,
    tcmalloc) the call reaches glibc's unused one, or a stub, and changes nothing (True may still be returned).
    Only the main arena is concerned: large blocks allocated by other threads are still mapped afresh.
    """
    chosen = _user_settings()
    if chosen:
        logger.debug("allocator left as the environment sets it (%s)", ", ".join(chosen))
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    logger.debug("allocator: freed memory kept for reuse: %s", done)
    return done
