"""set_mmap_threshold: allocations at or above the threshold get their own mapping, returned when freed."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PROBE = """
import ctypes, ctypes.util
from rlhf.utils.distributed import set_mmap_threshold

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p

def mappings():
    with open("/proc/self/maps") as f:
        return len(f.readlines())

for threshold in (1 << 20, 256 << 10):
    ok = set_mmap_threshold(threshold)
    before = mappings()
    block = libc.malloc(512 << 10)
    held = mappings()
    libc.free(ctypes.c_void_p(block))
    print(ok, held - before, mappings() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt and its mapping behaviour")
def test_half_megabyte_blocks_get_their_own_mapping_only_below_the_threshold():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    at_1_mib, at_256_kib = out.stdout.splitlines()
    assert at_1_mib == "True 0 0"  # 512 KiB from the heap
    assert at_256_kib == "True 1 0"  # 512 KiB mapped on its own, unmapped by free
