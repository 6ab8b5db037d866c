"""nfcv.allocator: freed memory stays in the heap for reuse (checked by page faults)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys, torch
from nfcv.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.empty(2**24).fill_(1.0)  # 64 MiB, touched: the first time always faults its pages in
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.empty(2**24).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_memory_is_reused_without_page_faults():
    pages = 10 * 2**26 // 4096  # ten 64 MiB blocks
    assert _faults("default") > 0.9 * pages  # each block a fresh mmap, faulted in again
    # The same heap memory, already resident: what is left are one-time faults where the heap
    # first grows (one or two blocks' worth, as the aligned blocks settle in the heap).
    assert _faults("keep") < 0.35 * pages


def test_other_c_libraries_are_left_alone(monkeypatch):
    from nfcv import allocator

    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert allocator.keep_freed_memory() is False


def test_a_refused_threshold_falls_back_to_32_mib(monkeypatch):
    """A glibc that caps the mmap threshold at 32 MiB gets 32 MiB, and the trim threshold is
    set on its own either way."""
    from nfcv import allocator

    calls = []

    class Libc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return int(param != allocator.M_MMAP_THRESHOLD or value <= 2**25)

    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("glibc", "2.28"))
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: Libc())
    assert allocator.keep_freed_memory() is True
    assert calls == [
        (allocator.M_MMAP_THRESHOLD, 2**31 - 1),
        (allocator.M_MMAP_THRESHOLD, 2**25),
        (allocator.M_TRIM_THRESHOLD, 2**31 - 1),
    ]
