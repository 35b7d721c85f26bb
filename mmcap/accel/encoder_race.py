"""int8 mode's encoder: the fastest of the runners this machine has, chosen by timing them.

The candidates compute the same grid different ways:
- torch's folded twin in the compute dtype `auto` chose (`mmcap.accel.folding`): bf16 where bf16
  matmuls measured fast, else fp32;
- the int8 twin (`mmcap.accel.int8_encoder`): u8 x s8 convolutions, calibrated on the first images;
- where that dtype is fp32 and `onnxruntime` is installed, the fp32 twin on ONNX Runtime
  (`mmcap.accel.ort_encoder`; it has no fast bf16 convolutions to race torch's bf16 with).

None wins on every CPU, so they are timed on the images being captioned, once per machine, encoder
shape and image shape (`mmcap.accel.timing`, which caches the choice for later processes); no CPU
flags are read. The runner chosen is kept as a twin of the encoder (`mmcap.accel.twins`).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from mmcap.accel import int8_encoder, ort_encoder, timing, twins
from mmcap.accel.folding import folded_encoder
from mmcap.accel.ort_encoder import Runner

log = logging.getLogger(__name__)


def fastest_encoder(encoder: nn.Module, dtype: torch.dtype, pixels: torch.Tensor) -> Runner:
    """The fastest of `encoder`'s runners (module docstring) for float dtype `dtype`, chosen the
    first time this machine meets this encoder shape and image shape."""
    kind = ("runner", dtype, tuple(pixels.shape[1:]))
    return twins.twin(encoder, kind, lambda: _choose(encoder, dtype, pixels)[1])


def choice(encoder: nn.Module, dtype: torch.dtype, pixels_shape: tuple) -> Optional[str]:
    """What `fastest_encoder` chose for `encoder` at this dtype and image shape ("torch int8", ...), if anything yet."""
    entry = timing.choice(_what(encoder, dtype, pixels_shape))
    return entry["use"] if entry else None


def _what(encoder: nn.Module, dtype: torch.dtype, shape: tuple) -> str:
    params = sum(p.numel() for p in encoder.parameters())
    return f"encoder {type(encoder).__name__} of {params:,} parameters, {str(dtype).replace('torch.', '')}, images {list(shape)}"


def _choose(encoder: nn.Module, dtype: torch.dtype, pixels: torch.Tensor) -> tuple[str, Runner]:
    makers = {f"torch {str(dtype).replace('torch.', '')}": lambda: _torch_runner(encoder, dtype)}
    if int8_encoder.available():
        makers["torch int8"] = lambda: _int8_runner_if_usable(encoder, pixels)
    if dtype == torch.float32 and ort_encoder.onnxruntime_available():
        makers["onnxruntime fp32"] = lambda: _ort_runner_if_usable(encoder, pixels)
    made: dict[str, Optional[Runner]] = {}

    def race() -> dict[str, float]:
        made.update({name: make() for name, make in makers.items() if name not in made})
        usable = {name: run for name, run in made.items() if run is not None}
        if len(usable) == 1:  # the others cannot run here: nothing to time
            return {name: 0.0 for name in usable}
        return timing.time_calls({name: lambda run=run: run(pixels) for name, run in usable.items()}, repeats=2)

    use = timing.fastest(_what(encoder, dtype, tuple(pixels.shape[1:])), list(makers), race)
    runner = made[use] if use in made else makers[use]()
    if runner is None:  # cached for a runner that cannot run here now: the float twin
        use, runner = next(iter(makers)), _torch_runner(encoder, dtype)
    if not use.startswith("onnxruntime"):
        ort_encoder.release(encoder)  # not chosen: free its memory
    return use, runner


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
    """ONNX Runtime's runner, or None where it cannot export or run this encoder (then torch runs
    it, and the reason is logged)."""
    try:
        run = ort_encoder.ort_runner(encoder)
        run(pixels[:1])
        return run
    except Exception as e:  # noqa: BLE001 - any failure only removes a candidate
        log.warning("mmcap int8 encoder: ONNX Runtime cannot run this encoder (%s: %s); torch runs it",
                    type(e).__name__, e)
        ort_encoder.release(encoder)
        return None
