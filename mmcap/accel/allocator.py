"""Keep freed memory for reuse while captioning on CPUs (glibc's malloc).

Decoding allocates the same large temporaries at every step and every call: 48 x 50,257 logits
(9.6 MB), the attention caches (37 MB for GPT-2 small, beam 3, batch 16), the encoder's
activations. glibc serves allocations above a threshold (128 KB, adapting up to 32 MB) straight
from the kernel and unmaps them on free, and it trims free memory above 128 KB off the top of
its heap: every call then faults its memory in again, page by page, zeroed (tens of thousands of
page faults per batch of 16; figures in docs/performance.md).

`keep_freed_memory()` sets those two glibc parameters once per process. The fast modes call it on
CPUs (`precision="fp32"` leaves the process as it is); it logs what it did. It changes the
process, not just mmcap: freed memory up to those sizes stays with the process instead of going
back to the system. `MMCAP_MALLOC_TUNING=0` turns it off; glibc's own environment variables
(`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`), where set, win. Elsewhere than Linux with
glibc it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
MMAP_THRESHOLD = 32 << 20  # glibc's largest: allocations up to this come from the heap
TRIM_THRESHOLD = 512 << 20  # free memory at the heap's top kept for the next call

_state: dict[str, bool] = {}


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (module docstring) once per process; whether they are set."""
    if "set" not in _state:
        _state["set"] = _tune()
    return _state["set"]


def _tune() -> bool:
    if not sys.platform.startswith("linux") or os.environ.get("MMCAP_MALLOC_TUNING", "1") == "0":
        return False
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return False  # the user's own settings
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        done = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    if done:
        log.info("mmcap: glibc keeps freed memory for reuse (allocations up to %d MB from the heap, up to %d MB "
                 "of it kept free; MMCAP_MALLOC_TUNING=0 turns this off)", MMAP_THRESHOLD >> 20, TRIM_THRESHOLD >> 20)
    return done
