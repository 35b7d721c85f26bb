"""Measuring for every benchmark: `log`, wall + CPU `clocks`, `best_time`, peak RSS, and `emit`,
which prints a result as one JSON line naming the machine (`machine_info`) it was measured on."""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from mmcap.accel.timing import cpu_model

# the flags that say which matmul units a CPU has (whether they pay is measured, never assumed)
MATMUL_FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni", "avx512f", "avx2")


def cpu_flags() -> list[str]:
    """Which of `MATMUL_FLAGS` this CPU has (from /proc/cpuinfo)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in MATMUL_FLAGS if f in have]
    except OSError:
        pass
    return []


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def clocks() -> tuple[float, float]:
    """Wall time, and CPU time of this process (all its threads): the CPU time hardly moves when
    other processes compete for the cores, so overheads compare fairly on a busy machine too."""
    return time.perf_counter(), time.process_time()


def best_time(fn: Callable[[], object], repeats: int = 3) -> tuple[float, float]:
    """Best wall and best CPU seconds of `fn` over `repeats` calls after a warm-up call."""
    fn()
    wall = cpu = float("inf")
    for _ in range(repeats):
        w0, c0 = clocks()
        fn()
        w1, c1 = clocks()
        wall, cpu = min(wall, w1 - w0), min(cpu, c1 - c0)
    return wall, cpu


def reset_peak_rss() -> None:
    """Start a new peak-memory window (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb(pid: Optional[int] = None) -> float:
    """Peak resident memory, in MiB, of this process (since start or `reset_peak_rss`) or of
    process `pid` (Linux only; NaN elsewhere)."""
    try:
        for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    if pid is not None:
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def machine_info() -> dict:
    """The machine a result was measured on: processor model, torch threads, load; and, under
    `emulate_cpu.py`, the other processor kind whose instruction sets the run was limited to."""
    info = {"cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_avg_1min": round(os.getloadavg()[0], 2)}
    if os.environ.get("MMCAP_EMULATED_CPU"):
        info["emulated_cpu"] = os.environ["MMCAP_EMULATED_CPU"]
    return info


def emit(result: dict) -> dict:
    """Print `result` and the machine it was measured on as one JSON line; return what was printed."""
    result = {**result, **machine_info()}
    print(json.dumps(result), flush=True)
    return result
