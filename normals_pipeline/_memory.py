"""Freed image buffers go back to the operating system (glibc only).

glibc serves an allocation of at least its mmap threshold (128 KiB at start) with a mapping of its own, which
`free` returns to the OS. But each time such a block is freed the threshold rises to its size (up to 32 MiB),
so after the first freed image every later image, map and Parquet part of that size comes from a heap arena,
one per busy thread, where a freed block stays part of the process. A run that streams megabytes per image
through many threads then keeps the peak of each phase (the plan's reads, the requests, the training pairs).
Fixing it (as `mallopt` does, or `MALLOC_MMAP_THRESHOLD_`) keeps large blocks mapped, for a map and its page
faults per block, small beside the image it holds. Bench figure 4a (2 MB images at 3000 rpm), with the
training parts' change of the same commit: peak RSS 796 -> 625-657 MB.
"""

from __future__ import annotations

import ctypes
import functools
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, kept from moving
ENVIRONMENT = "MALLOC_MMAP_THRESHOLD_"  # glibc reads it at start: a user's setting there wins


@functools.cache
def return_freed_buffers() -> bool:
    """Fix glibc's mmap threshold for this process, once; False where it does not apply (another C library,
    or the variable set by the user)."""
    if ENVIRONMENT in os.environ or not _glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1


def _glibc() -> bool:
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError, AttributeError):  # not a GNU system, or no confstr at all
        return False
    return (version or "").startswith("glibc ")
