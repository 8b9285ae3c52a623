"""Giving the C heap's free memory back to the system after the periodic checkpoint.

A checkpoint copies every policy and serializes it (d=64, 16 models: about 4 MB per
policy, ~30 MB allocated and freed within a second, from whichever worker thread runs
it). glibc keeps freed memory in that thread's arena (up to 8 per core) for later
mallocs instead of returning it, so each checkpoint left up to ~25-30 MB of free but
resident memory behind, in a different arena each time: the server's RSS rose in steps
at every checkpoint although the live heap stayed flat (measured with
``benchmarks/memory_probe.py``, docs/reliability.md, load). ``malloc_trim(0)`` after the
checkpoint returns the free pages of every arena to the system (a few ms).

Elsewhere than glibc (musl, macOS) there is no ``malloc_trim``: nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["release_free_memory", "then_release_free_memory"]

log = logging.getLogger("service.memory")


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """``malloc_trim(0)`` where glibc has it; True when it ran."""
    trim = _malloc_trim()
    if trim is None:
        return False
    start = time.perf_counter()
    trim(0)
    log.debug("malloc_trim took %.1f ms", (time.perf_counter() - start) * 1e3)
    return True


def then_release_free_memory(job: Callable[[], Any]) -> Callable[[], Any]:
    """``job`` followed by :func:`release_free_memory` (unless it returned False: a
    checkpoint that had nothing new to write allocated nothing)."""

    @functools.wraps(job)
    def run() -> Any:
        result = job()
        if result is not False:
            release_free_memory()
        return result

    return run
