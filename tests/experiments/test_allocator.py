"""The program's allocator settings: glibc keeps freed memory for reuse, unless the environment chose otherwise."""

import ctypes
import json
import os
import platform
import subprocess
import sys

import pytest

from metaquant.experiments import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
# the probe reads the allocator's statistics with mallinfo2 (glibc 2.33 and later)
MALLINFO2 = GLIBC and hasattr(ctypes.CDLL(None), "mallinfo2")
needs_mallinfo2 = pytest.mark.skipif(not MALLINFO2, reason="glibc 2.33 or later (mallinfo2)")

# Allocates 64 MB and prints what reuse_freed_memory returned and the bytes glibc holds in memory mappings before
# and after (mallinfo2's hblkhd): a fresh mapping serves the block unless freed memory is kept for reuse. The
# module needs the standard library only, so the probe runs it without importing torch.
PROBE = """
import ctypes, json, runpy, sys

class Info(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(n, ctypes.c_size_t) for n in names.split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype, libc.malloc.restype = Info, ctypes.c_void_p
reuse_freed_memory = runpy.run_path(sys.argv[2])["reuse_freed_memory"]
done = reuse_freed_memory() if sys.argv[1] == "reuse" else None
before = libc.mallinfo2().hblkhd
block = libc.malloc(64 * 2**20)
print(json.dumps({"done": done, "mapped": libc.mallinfo2().hblkhd - before}))
"""


def _probe(mode, **env):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"} | env
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode, allocator.__file__], capture_output=True, text=True, check=True, env=environ
    )
    return json.loads(done.stdout.splitlines()[-1])


@needs_mallinfo2
def test_a_large_block_comes_from_reused_heap_memory_instead_of_a_fresh_mapping():
    assert _probe("none")["mapped"] >= 64 * 2**20  # glibc's default: a mapping of its own
    assert _probe("reuse") == {"done": True, "mapped": 0}


@needs_mallinfo2
@pytest.mark.parametrize(
    "env", [{"MALLOC_MMAP_THRESHOLD_": "1048576"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"}]
)
def test_the_environment_s_own_settings_of_those_parameters_stand(env):
    result = _probe("reuse", **env)
    assert result["done"] is False and result["mapped"] >= 64 * 2**20


@needs_mallinfo2
@pytest.mark.parametrize("env", [{"MALLOC_ARENA_MAX": "2"}, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}])
def test_other_malloc_settings_do_not_interfere(env):
    assert _probe("reuse", **env) == {"done": True, "mapped": 0}


def test_off_glibc_nothing_is_changed(monkeypatch):
    for name in (*allocator.USER_SETTINGS, "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert allocator.reuse_freed_memory() is False
