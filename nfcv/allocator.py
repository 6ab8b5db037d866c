"""The C allocator's settings for training on a CPU.

glibc's malloc serves every block above its mmap threshold (128 KiB, rising to at most 32 MiB as
blocks are freed) with a fresh ``mmap`` and gives it back to the kernel on ``free``. A training
step allocates and frees the same activations every step, so each step then faults every page
of them in again and the kernel zeroes it: about 42,000 page faults and 0.1 s of system time per
step of Glow at the benchmark's `paper` size (`python -m nfcv.bench`; README, Speed). Keeping
freed memory in the heap for reuse removes them. The price: the process's resident memory stays
at its peak instead of shrinking between steps, which a training process reaches every step
anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap, and the heap's top is not trimmed (returned to the
# kernel) below this much free memory: the largest value mallopt's int argument takes. Some
# glibc releases refuse an mmap threshold above 32 MiB (HEAP_MAX_SIZE / 2; 2.36 here takes the
# larger value), so that is tried next.
_KEEP = (2**31 - 1, 2**25)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the kernel.

    Returns whether the settings took effect: False where the C library is not glibc (macOS,
    musl), where nothing changes. Applies to the whole process from the call on.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    ok = True
    for param in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD):  # each on its own: one may be refused
        if not any(libc.mallopt(param, value) for value in _KEEP):
            ok = False
    if not ok:
        log.warning("nfcv: glibc's mallopt refused the settings; freed memory is returned")
    return ok
