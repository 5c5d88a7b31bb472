"""Process memory: hand large freed buffers back to the operating system at once (glibc)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
LARGE_ALLOCATION_BYTES = 128 * 1024


def return_large_frees_to_the_os(threshold: int = LARGE_ALLOCATION_BYTES) -> bool:
    """Serves allocations of ``threshold`` bytes or more from their own mappings, so that freeing one
    returns its memory at once. Returns False where the C library has no ``mallopt`` (not glibc).

    glibc raises this threshold after the first large free and then keeps later large buffers in
    per-thread arenas: a gateway decoding one 66 MB image at a time on 16 threads held 310 MB of RSS,
    and 66 MB with a fixed threshold (tests/gateway/test_e2e_memory.py). The cost is a fresh mapping
    (page faults) per large buffer, small next to decoding what fills it.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        log.info("mallopt is not available; freed memory may be kept by the C library")
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))
