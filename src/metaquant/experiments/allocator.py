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
#: Free memory at the top of the heap beyond this is given back to the system (glibc: 128 kB, raised up to
#: 32 MB as it goes): the largest value mallopt takes, 2 GiB.
_TRIM_THRESHOLD = 2**31 - 1


def _user_settings() -> list[str]:
    """The environment variables by which the user already chose glibc malloc's behaviour: theirs stands."""
    names = [name for name in os.environ if name.startswith("MALLOC_")]
    return names + (["GLIBC_TUNABLES"] if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") else [])


def reuse_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (no memory mappings, no trimming); True when it was set.

    Nothing is changed, and False returned, off glibc (macOS, musl, Windows) or when the environment already sets
    malloc's parameters (``MALLOC_*`` variables, ``glibc.malloc`` tunables). With another allocator preloaded
    (jemalloc, tcmalloc) the call reaches glibc's unused one, or a no-op, and changes nothing.
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
