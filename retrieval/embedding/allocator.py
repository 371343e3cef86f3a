"""Keep glibc's malloc from giving large tensors' pages back to the OS after every forward pass.

glibc serves a request above its mmap threshold (adaptive, but never above 32 MiB) with fresh
pages from mmap and unmaps them on free. EfficientNet-Lite0 at batch 8 allocates activations of
up to ~40 MB, so every forward pass faulted in (and the kernel zeroed) ~240 MB of new pages:
3.9 million minor page faults per 512 images on 2 cores, about half the encoder's time. With the
mmap and trim thresholds raised, freed activations stay in the heap and are reused: no faults,
Lite0 at batch 8 went from ~60 to ~105 images/s (batch 1: 53 -> 68). The price is that the
process keeps its peak heap instead of returning up to 1 GiB of freed memory to the OS (a few
hundred MB for the default model's passes, more after a rare huge query image), which a server
or a batch job reuses anyway. The 1 GiB covers batch 32 (with 256 MiB it page-faults again).

Threads need one more setting, which only the environment can make: MALLOC_ARENA_MAX=1 when the
process starts (the container image sets it). Each thread other than the main one allocates from
an arena of its own, made of heaps of at most 64 MiB, and glibc unmaps such a heap as soon as it
is empty, whatever the trim threshold: a Lite0 pass at batch 8 in a worker thread (as the
server's executor runs them; torch's intra-op threads too) faulted in 25,000-40,000 pages on most
passes here with the thresholds raised. With one arena, every thread's freed activations stay in
the main heap: 0 faults per pass once it has grown. (mallopt's M_ARENA_MAX at run time is no
substitute: a new thread still takes the arena an exited one left, or shares an existing one.)
The price, one malloc lock for every thread, is small: tcache serves small blocks without it.

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
_THRESHOLDS = (1 << 30, 32 << 20)  # 1 GiB; older glibc refuses an mmap threshold over 32 MiB
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
        for threshold in _THRESHOLDS:
            if libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, threshold) == 1:
                log.debug("malloc mmap/trim thresholds raised to %d MiB", threshold >> 20)
                _done = True
                return True
    except (OSError, AttributeError) as e:
        log.warning("could not tune malloc (%s): CPU forward passes will page-fault their activations", e)
        return False
    log.warning("glibc refused to raise malloc's mmap threshold: CPU forward passes will page-fault their activations")
    return False
