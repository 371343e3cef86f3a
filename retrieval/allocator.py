"""Keep glibc's malloc from giving large tensors' pages back to the OS after every forward pass.

glibc serves a request above its mmap threshold (adaptive, but never above 32 MiB) with fresh
pages from mmap and unmaps them on free. EfficientNet-Lite0 at batch 8 allocates activations of
up to ~40 MB, so every forward pass faulted in (and the kernel zeroed) ~240 MB of new pages:
3.9 million minor page faults per 512 images on 2 cores, about half the encoder's time. With the
mmap and trim thresholds raised, freed activations stay in the heap and are reused: no faults,
Lite0 at batch 8 went from ~60 to ~105 images/s (batch 1: 53 -> 68). The price is that the
process keeps its peak heap (a few hundred MB for the default model), which a server or a
batch job reuses anyway.

PyTorch's CPU tuning guide fixes the same problem by preloading jemalloc or tcmalloc; this needs
no preload and no extra package (why it is hand-written: `mallopt` is one libc call). Elsewhere
than glibc it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30  # 1 GiB: anything a forward pass allocates stays in the heap
_done = False


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True when they are in effect.
    Affects allocations made after the call (DataLoader workers forked later inherit it)."""
    global _done
    if _done:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _THRESHOLD) == 1
    except (OSError, AttributeError) as e:
        log.debug("malloc tuning unavailable: %s", e)
        return False
    _done = ok
    log.debug("malloc mmap/trim thresholds raised to %d bytes: %s", _THRESHOLD, ok)
    return ok
