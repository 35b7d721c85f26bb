"""Weights that a decoding step streams from memory, on 2 MB pages (Linux transparent huge pages).

Why: a step of the `int8` plan reads every packed weight of the decoder once, 124 MB for GPT-2
small, from memory. On 4 KB pages that stream crosses a page every 4 KB: the hardware prefetchers
stop at each crossing and the TLB misses about 30,000 times a step. On 2 MB pages a step's 73
int8 layers ran 1.10x (48 rows) to 1.15x (24 rows) faster on the AMX Xeon (docs/performance.md).
Linux gives huge pages only to memory that asks for them (`madvise`, the default setting of
`/sys/kernel/mm/transparent_hugepage/enabled`), and torch's allocator does not ask.

`place(t)` copies `t` into a shared arena of anonymous mappings that ask for huge pages and
returns the copy (same shape, dtype and values). Tensors placed one after another sit next to
each other, so a model's layers, packed in order, form one stream. A mapping is unmapped when
the last tensor in it is freed. Elsewhere than Linux, or with `MMCAP_HUGEPAGES=0`, `place`
returns `t` itself.
"""
from __future__ import annotations

import mmap
import os
import sys
import threading
from typing import Optional

import torch

HUGE_PAGE = 2 << 20
CHUNK = 64 << 20  # one mapping's size; a tensor over half of it gets a mapping of its own
ALIGN = 4096  # each tensor starts on its own 4 KB page


def available() -> bool:
    return (sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")
            and os.environ.get("MMCAP_HUGEPAGES", "1") != "0")


def _mapping(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of `nbytes` (a multiple of 2 MB) on 2 MB-aligned anonymous memory that asks
    for huge pages. It keeps its mapping alive (torch.frombuffer holds the mmap object)."""
    mm = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(mm, dtype=torch.uint8)
    start = (-whole.data_ptr()) % HUGE_PAGE
    mm.madvise(mmap.MADV_HUGEPAGE, start, nbytes)
    return whole[start:start + nbytes]


class _Arena:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.chunk: Optional[torch.Tensor] = None
        self.used = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """`nbytes` of fresh huge-page memory, as a uint8 tensor."""
        if nbytes > CHUNK // 2:
            return _mapping(-(-nbytes // HUGE_PAGE) * HUGE_PAGE)[:nbytes]
        with self.lock:
            if self.chunk is None or self.used + nbytes > self.chunk.numel():
                self.chunk, self.used = _mapping(CHUNK), 0
            out = self.chunk[self.used:self.used + nbytes]
            self.used += -(-nbytes // ALIGN) * ALIGN
            return out


_arena = _Arena()


def place(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy of `t` on huge pages (see the module docstring), or `t` where they are
    unavailable or `t` is not a CPU tensor."""
    if t.device.type != "cpu" or t.numel() == 0 or not available():
        return t
    try:
        out = _arena.take(t.numel() * t.element_size())
    except (OSError, ValueError):  # no memory for a mapping, or madvise refused: leave `t` where it is
        return t
    out = out.view(t.dtype).view(t.shape)
    out.copy_(t)
    return out
