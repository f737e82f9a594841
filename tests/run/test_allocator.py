"""`allocator: keep` really keeps freed memory mapped (glibc, Linux), so the next step reuses warm pages."""

import subprocess
import sys

import pytest

PROBE = """
import sys, torch
from phi3lit.run.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
before = rss_mb()
x = torch.ones(64 * 2**20)  # 256 MB, touched: the size of a step's large buffers
del x
print(rss_mb() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_keep_freed_memory_holds_a_freed_buffer_and_system_returns_it():
    kept = {}
    for mode in ("keep", "system"):
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        kept[mode] = float(out.stdout.split()[-1])
    assert kept["keep"] > 200  # still resident after the free: reusable without page faults
    assert kept["system"] < 50  # glibc's default munmaps a buffer this large on free
