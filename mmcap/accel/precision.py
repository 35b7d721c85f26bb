"""Whether bf16 pays on this machine: decided by measuring, not by CPU flags.

The same CPU flags (avx512_bf16) sit on processors where bf16 matmuls run 4x faster than fp32 and
on ones where they run at half the speed (an Intel Xeon without AMX). So `auto` times a few small
matmuls in each dtype, once per machine (`mmcap.accel.timing`, which caches the choice), and takes
bf16 only where it is clearly faster: it also costs a little accuracy.
"""
from __future__ import annotations

import functools
import logging
import sys
from typing import Union

import torch

from mmcap.accel import timing

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "auto", "int8")  # int8: captioning only, the decoder's linears (mmcap.accel.quantize)
# Lightning's names for the same choice, for recipes (`trainer.precision: auto`).
LIGHTNING_PRECISION = {torch.float32: "32-true", torch.bfloat16: "bf16-mixed"}
BF16_MIN_SPEEDUP = 1.15
MATMUL_SIZE = 512
WHAT = f"matmul {MATMUL_SIZE} x {MATMUL_SIZE} x {MATMUL_SIZE}, 4 in a row"


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def bf16_is_fast(device: Union[str, torch.device] = "cpu") -> bool:
    """Whether bf16 pays on `device`: native bf16 on CUDA; on CPUs, measured."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    return _cpu_choice() == "bf16"


@functools.lru_cache(maxsize=None)
def _cpu_choice() -> str:
    return timing.fastest(WHAT, ("fp32", "bf16"), measure_matmuls, prefer="fp32", margin=BF16_MIN_SPEEDUP)


def cpu_bf16_speedup() -> float:
    """bf16 matmul throughput over fp32 on this CPU, as timed (and cached) for `auto`."""
    _cpu_choice()
    seconds = timing.choice(WHAT)["seconds"]
    return seconds["fp32"] / seconds["bf16"]


def measure_matmuls(size: int = MATMUL_SIZE, repeats: int = 5) -> dict[str, float]:
    """Seconds of four `size`² matmuls in a row, in fp32 and in bf16 (`timing.time_calls`)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    pairs = {"fp32": (a, b), "bf16": (a.bfloat16(), b.bfloat16())}

    def four(x, y):
        for _ in range(4):
            torch.mm(x, y)

    return timing.time_calls({name: functools.partial(four, *xy) for name, xy in pairs.items()}, repeats)


def compute_dtype(precision: str, device: Union[str, torch.device] = "cpu") -> torch.dtype:
    """The dtype `precision` computes in on `device` (`auto` and `int8`: bf16 where it pays)."""
    if check_precision(precision) in ("auto", "int8"):
        return torch.bfloat16 if bf16_is_fast(device) else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def lightning_precision(precision, device: str = "cpu"):
    """A recipe's `trainer.precision` for Lightning: `auto` resolved to `bf16-mixed` or `32-true`
    by measuring this machine; other values pass through."""
    if precision != "auto":
        return precision
    return LIGHTNING_PRECISION[compute_dtype("auto", device)]


def trainer_precision(precision, accelerator="auto"):
    """Lightning's `Trainer(precision=...)` for a recipe's value: `auto` resolved (and said on
    stderr) for the device `accelerator` names; other values pass through."""
    if precision != "auto":
        return precision
    name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__.lower()
    device = "cuda" if name in ("gpu", "cuda") or (name == "auto" and torch.cuda.is_available()) else "cpu"
    resolved = lightning_precision("auto", device)
    detail = f"bf16 {cpu_bf16_speedup():.2f}x fp32 matmul speed" if device == "cpu" else "CUDA"
    print(f"mmcap: trainer.precision auto -> {resolved} ({detail})", file=sys.stderr)
    return resolved
