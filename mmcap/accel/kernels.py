"""mmcap's C++ kernels for cached decoding on CPUs, built at first use: one-query attention, and
int8 linear layers on AMX where the CPU has it (`csrc/int8_matmul.cpp`, raced against torch's
quantized engines by `mmcap.accel.quantize`).

A decoding step attends with one query per beam and head. Torch runs that as a chain of calls per
layer (cast, gather, `cat`, matmul, softmax, matmul), each with a fixed cost that dwarfs its
arithmetic at these sizes, and the growing self-attention cache is copied by every `cat` and every
beam reorder. The kernels here do one layer's attention in one call: the cache is preallocated,
row n's position p is read from cache row `anc[n, p]` (a beam reorder permutes that table, copying
no keys), and the beams of an image read its keys once.

The sources (`csrc/*.cpp`) are compiled with `torch.utils.cpp_extension` on first
use for this CPU (`-march=native`; seconds, once per machine) into the operators `torch.ops.mmcap.*`, under
`MMCAP_CACHE_DIR` (default `~/.cache/mmcap`)/kernels, keyed by the sources, the CPU and torch.
Without a C++ compiler, or with `MMCAP_KERNELS=0`, decoding keeps torch's ops; where both run,
`mmcap.accel.kernel_attention` times them against each other.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch

from mmcap.accel.timing import cache_root, cpu_model

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "one_query_attention.cpp"
INT8_SOURCE = SOURCE.with_name("int8_matmul.cpp")  # int8 linear layers on AMX (`mmcap.accel.quantize`)
ROW_TOP_SOURCE = SOURCE.with_name("row_top.cpp")  # beam search's log-softmax top k (`log_softmax_top`)
SOURCES = (SOURCE, INT8_SOURCE, ROW_TOP_SOURCE)  # compiled together
HEADERS = (SOURCE.with_name("vec.h"),)  # what the sources include
HEAD_DIMS = (16, 32, 64, 128)  # the head sizes the source instantiates
DTYPES = ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),  # and its (caches, queries) dtypes
          (torch.bfloat16, torch.bfloat16), (torch.int8, torch.float32), (torch.int8, torch.bfloat16))
# OpenMP only where torch's own parallel backend is OpenMP (at::parallel_for inlines it); macOS
# builds of torch use their native backend, and Apple's clang has no -fopenmp
OPENMP = "OpenMP" in torch.__config__.parallel_info()
FLAGS = ["-O3", "-march=native"] + (["-fopenmp"] if OPENMP else [])
FAILED = "FAILED"  # written into a key's build directory when its build failed: not retried per process
_LOADED: dict = {}  # torch registers a library's operators once per process: never load a second copy


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def build_key() -> str:
    """What the compiled module depends on: a binary built with -march=native for one CPU may not
    run on another that shares the cache directory."""
    parts = [*(source.read_bytes() for source in SOURCES + HEADERS),
             cpu_model().encode(), _cpu_flags().encode(),
             torch.__version__.encode(), sys.version.encode(), " ".join(FLAGS).encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def kernels():
    """The compiled kernels (`self_attend`, `cross_attend`; `int8_linear` where `amx_int8()`), or None
    where they cannot be built."""
    if os.environ.get("MMCAP_KERNELS", "1") == "0":
        return None
    build = None
    try:
        key = build_key()
        build = cache_root() / "kernels" / key
        if (build / FAILED).exists():  # said once, when it failed; a compile attempt per process costs seconds
            log.info("mmcap: the attention kernels failed to build here before (%s; delete it to retry); "
                     "decoding uses torch's ops", build / FAILED)
            return None
        if "ops" in _LOADED:  # built and loaded already in this process (from another cache directory, say)
            return _LOADED["ops"]
        cpp_extension = _import_cpp_extension()
        build.mkdir(parents=True, exist_ok=True)
        fresh = not any(build.glob("*.so"))
        if fresh:
            # a warning: the first call pauses for it, and nothing else would say why
            log.warning("mmcap: compiling the attention kernels for this CPU, once (about 10 s) into %s", build)
        start = time.perf_counter()
        cpp_extension.load(name=f"mmcap_attention_{key}", sources=[str(source) for source in SOURCES],
                           extra_cflags=FLAGS, extra_ldflags=["-fopenmp"] if OPENMP else [], build_directory=str(build),
                           is_python_module=False, verbose=False)
        if fresh:
            log.info("mmcap: attention kernels built in %.1f s", time.perf_counter() - start)
        ops = torch.ops.mmcap  # the overloads themselves: no lookup per call
        _LOADED["ops"] = SimpleNamespace(**{name: getattr(ops, name).default for name in (
            "self_attend", "self_attend_rows", "cross_attend", "amx_int8", "vnni_int8", "int8_pack", "int8_linear",
            "int8_linear_top", "log_softmax_top", "pack_image_kv", "vnni_image_kv")})
        return _LOADED["ops"]
    except Exception as e:  # no compiler, no headers, a read-only cache: torch's ops do the work
        what = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        marker = _mark_failed(build, what)
        log.warning("mmcap: the attention kernels could not be built (%s); decoding uses torch's ops%s", what,
                    f" (not retried while {marker} exists)" if marker else "")
        return None


def _mark_failed(build: Optional[Path], what: str) -> Optional[Path]:
    """Best effort: a read-only cache just tries again next time."""
    if build is None:
        return None
    try:
        build.mkdir(parents=True, exist_ok=True)
        (build / FAILED).write_text(what + "\n")
        return build / FAILED
    except OSError:
        return None


def _import_cpp_extension():
    """torch.utils.cpp_extension, without the CUDA notice it logs on import on CPU-only machines
    (every process that loads the kernels would print it)."""
    notices = logging.getLogger("torch.utils.cpp_extension")
    level = notices.level
    notices.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        notices.setLevel(level)
    return cpp_extension
