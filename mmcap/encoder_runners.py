"""int8 mode's encoder: the fastest of the runners this machine has, chosen by timing them.

The candidates compute the same grid different ways:
- torch's folded twin in the compute dtype `auto` chose (`mmcap.folding`): bf16 where bf16
  matmuls measured fast, else fp32;
- the int8 twin (`mmcap.int8_encoder`): u8 x s8 convolutions, calibrated on the first images;
- where that dtype is fp32 and `onnxruntime` is installed, the fp32 twin on ONNX Runtime
  (`mmcap.ort_encoder`; it has no fast bf16 convolutions to race torch's bf16 with).

None wins on every CPU, so each is timed once per encoder (as its weights are now) and image
shape, on the images being captioned; the fastest is kept and the figures are logged. No CPU
flags are read. On a 2-core AMD EPYC, ResNet-50 on 16 images at 224 px: torch bf16 0.19 s,
int8 0.084-0.095 s, torch fp32 0.39 s, ONNX Runtime fp32 0.30 s.
"""
from __future__ import annotations

import logging
import time
import weakref
from typing import Optional

import torch
from torch import nn

from . import int8_encoder, ort_encoder
from .folding import fingerprint, folded_encoder
from .ort_encoder import Runner

log = logging.getLogger(__name__)

# per encoder: {(fingerprint, dtype, image shape): (name, runner)}
_CHOICES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def fastest_encoder(encoder: nn.Module, dtype: torch.dtype, pixels: torch.Tensor) -> Runner:
    """The fastest of `encoder`'s runners (module docstring) for float dtype `dtype`, timed on
    `pixels` the first time this encoder (as it is now) meets images of this shape."""
    key = (fingerprint(encoder), dtype, tuple(pixels.shape[1:]))
    choices = _CHOICES.setdefault(encoder, {})
    if key not in choices:
        candidates = {f"torch {str(dtype).replace('torch.', '')}": _torch_runner(encoder, dtype)}
        int8_run = _int8_runner_if_usable(encoder, pixels)
        if int8_run is not None:
            candidates["torch int8"] = int8_run
        ort_run = _ort_runner_if_usable(encoder, pixels) if dtype == torch.float32 else None
        if ort_run is not None:
            candidates["onnxruntime fp32"] = ort_run
        times = {name: _time(run, pixels) for name, run in candidates.items()} if len(candidates) > 1 else {}
        best = min(times, key=times.get) if times else next(iter(candidates))
        if times:
            log.info("mmcap int8 encoder: %s (%s, %d images)", best,
                     ", ".join(f"{n} {t:.3f} s" for n, t in times.items()), len(pixels))
        for stale in [k for k in choices if k[0] != key[0]]:  # made for older weights
            del choices[stale]
        choices[key] = (best, candidates[best])
        if not best.startswith("onnxruntime"):
            ort_encoder.release(encoder)  # not chosen: free its memory
    return choices[key][1]


def choice(encoder: nn.Module) -> Optional[str]:
    """What `fastest_encoder` chose last for `encoder` ("torch bfloat16", "torch int8", ...)."""
    held = _CHOICES.get(encoder)
    return list(held.values())[-1][0] if held else None


def _torch_runner(encoder: nn.Module, dtype: torch.dtype) -> Runner:
    twin = folded_encoder(encoder, dtype)
    return lambda pixels: twin(pixels.to(dtype).contiguous(memory_format=torch.channels_last))


def _int8_runner_if_usable(encoder: nn.Module, pixels: torch.Tensor) -> Optional[Runner]:
    """The int8 twin (calibrated on `pixels` when first made), or None where it cannot run this
    encoder: not a torchvision ResNet, no oneDNN int8 kernels, or a failure (logged)."""
    try:
        run = int8_encoder.int8_encoder(encoder, pixels)
        run(pixels[:1])
        return run
    except int8_encoder.Unsupported as e:
        log.info("mmcap int8 encoder: no int8 convolutions (%s)", e)
    except Exception as e:  # noqa: BLE001 - any failure only removes a candidate
        log.warning("mmcap int8 encoder: int8 convolutions failed here (%s: %s); the float encoder runs",
                    type(e).__name__, e)
    return None


def _ort_runner_if_usable(encoder: nn.Module, pixels: torch.Tensor) -> Optional[Runner]:
    """ONNX Runtime's runner, or None where onnxruntime is missing or cannot export or run this
    encoder (then torch runs it, and the reason is logged)."""
    if not ort_encoder.onnxruntime_available():
        return None
    try:
        run = ort_encoder.ort_runner(encoder)
        run(pixels[:1])
        return run
    except Exception as e:  # noqa: BLE001 - any failure only removes a candidate
        log.warning("mmcap int8 encoder: ONNX Runtime cannot run this encoder (%s: %s); torch runs it",
                    type(e).__name__, e)
        ort_encoder.release(encoder)
        return None


def _time(run: Runner, pixels: torch.Tensor, repeats: int = 2) -> float:
    """Best of `repeats` timed calls after one warm-up."""
    with torch.no_grad():
        run(pixels)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            run(pixels)
            best = min(best, time.perf_counter() - start)
    return best
