"""What a `precision` option means, and `auto` decided by measuring, not by CPU flags.

The same CPU flags (avx512_bf16) sit on processors where bf16 matmuls run 4x faster than fp32
(AMD EPYC) and on ones where they run at half the speed (an Intel Xeon without AMX). So `auto`
times a few small matmuls in each mode, once per machine, and keeps the faster; the decision
and its figures are logged and cached in `~/.cache/mmcap/precision.json` (keyed by processor,
thread count and torch version; `MMCAP_CACHE_DIR` moves it).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "auto", "int8")  # int8: captioning only, the decoder's linears (mmcap.quantize)
# Lightning's names for the same choice, for recipes (`trainer.precision: auto`).
LIGHTNING_PRECISION = {torch.float32: "32-true", torch.bfloat16: "bf16-mixed"}
BF16_MIN_SPEEDUP = 1.15  # bf16 must beat fp32 clearly: it also costs a little accuracy


def compute_dtype(precision: str, device: Union[str, torch.device] = "cpu") -> torch.dtype:
    """The dtype that `precision` ("fp32", "bf16", "auto" or "int8") means on `device`; with
    "int8" that is the encoder's (as `auto`), the decoder's linear layers computing in int8."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision in ("auto", "int8"):
        return torch.bfloat16 if bf16_is_fast(device) else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def decoder_int8(precision: str, device: Union[str, torch.device] = "cpu") -> bool:
    """Whether `precision` runs the decoder's linear layers in int8 on `device`: asked for, and a
    CPU; elsewhere (GPUs) "int8" falls back to "auto" (logged once)."""
    if precision != "int8":
        return False
    from .quantize import int8_available

    if int8_available(device):
        return True
    _warn_no_int8(str(torch.device(device)))
    return False


@functools.lru_cache(maxsize=None)
def _warn_no_int8(device: str) -> None:
    log.warning("mmcap precision: int8 runs on CPUs, not on %s: it falls back to auto there", device)


def lightning_precision(precision: str, device: str = "cpu") -> str:
    """`auto` resolved to Lightning's `bf16-mixed` or `32-true`; other values pass through."""
    if precision != "auto":
        return precision
    return LIGHTNING_PRECISION[compute_dtype("auto", device)]


def bf16_is_fast(device: Union[str, torch.device] = "cpu") -> bool:
    """Whether bf16 pays on `device`: native bf16 on CUDA; on CPUs, measured."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    return cpu_bf16_speedup() >= BF16_MIN_SPEEDUP


@functools.lru_cache(maxsize=None)
def cpu_bf16_speedup() -> float:
    """bf16 matmul throughput over fp32 on this CPU, from the cache file or measured now."""
    key = machine_key()
    cache = _cache_path()
    cached = _read_cache(cache).get(key)
    if cached is not None:
        return float(cached["speedup"])
    timings = measure_matmuls()
    speedup = timings["fp32"] / timings["bf16"]
    log.info("mmcap precision: %s: fp32 %.1f GFLOP/s, bf16 %.1f GFLOP/s (%.2fx): auto chooses %s", key,
             timings["fp32_gflops"], timings["bf16_gflops"], speedup,
             "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32")
    _write_cache(cache, key, {**timings, "speedup": speedup})
    return speedup


def measure_matmuls(size: int = 512, repeats: int = 5, timer: Callable[[], float] = time.perf_counter) -> dict:
    """Best-of-`repeats` seconds of `size`² matmuls (a few in a row) in fp32 and bf16."""
    out = {}
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    flops = 2 * size**3 * 4
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x, y = a.to(dtype), b.to(dtype)
        torch.mm(x, y)  # warm-up: kernel selection, page faults
        best = float("inf")
        for _ in range(repeats):
            start = timer()
            for _ in range(4):
                torch.mm(x, y)
            best = min(best, timer() - start)
        out[name] = max(best, 1e-9)
        out[f"{name}_gflops"] = flops / out[name] / 1e9
    return out


def cpu_model() -> str:
    """The processor's model name (`lscpu`'s "Model name"), for logs and benchmark output."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    return f"{cpu_model()} | {torch.get_num_threads()} threads | torch {torch.__version__}"


def cache_root() -> Path:
    """Where mmcap keeps what it measured or built for this machine (`MMCAP_CACHE_DIR`)."""
    return Path(os.environ.get("MMCAP_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mmcap"))


def _cache_path() -> Optional[Path]:
    return cache_root() / "precision.json"


def _read_cache(path: Optional[Path]) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}


def _write_cache(path: Optional[Path], key: str, value: dict) -> None:
    """Best effort (a read-only home just measures again next time); atomic rename."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        data[key] = value
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".precision-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        log.debug("cannot cache the precision measurement in %s: %s", path, e)
