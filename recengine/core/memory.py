"""Giving freed memory back to the system, so that a long job's resident memory follows its chunk size.

glibc's malloc serves a large array from its own mapping (returned on free) only above a threshold that
it raises, by itself, up to 32 MB as soon as one such array is freed. After that, arrays of a few MB
to 32 MB (a chunk's columns, score blocks) land in the heap or in the threads' arenas, and freed space
there stays resident. At 20M events that held 1-2 GB above what a chunk needs (one probe: 6.6-7.6 GB
peak, against 5.7 GB with the threshold fixed at 4 MB). Fixing the threshold keeps every array of 4 MB
or more in its own mapping, returned the moment it is freed.
"""

from __future__ import annotations

import ctypes
import os

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
MMAP_THRESHOLD = 4 * 1024 * 1024


def return_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes for this process; True if it was set.

    Does nothing where the C library is not glibc (macOS, musl), and nothing when the user already chose
    a threshold through glibc's own variable MALLOC_MMAP_THRESHOLD_ (theirs wins)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    mallopt = _glibc_mallopt()
    return bool(mallopt is not None and mallopt(M_MMAP_THRESHOLD, threshold) == 1)


def _glibc_mallopt():
    try:
        # The process's own symbols, libc's among them: no search for the library (find_library runs
        # ldconfig, or a compiler, in a subprocess at every command's start).
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only; musl has mallopt but other option numbers
    except (OSError, AttributeError):
        return None
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt
