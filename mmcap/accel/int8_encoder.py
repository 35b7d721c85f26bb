"""The ResNet encoder in int8, for `precision="int8"` on CPUs where it measures faster.

A convolution in int8 (u8 activations x s8 weights, oneDNN's VNNI kernels) does twice the work of
bf16 per cycle, and four times fp32's; where bf16 is slow (an Intel Xeon with VNNI but no AMX runs
bf16 at half fp32's speed) the gap is the widest. Timings: docs/performance.md.

How it runs: BatchNorm folded into every convolution (`mmcap.accel.folding`); weights per output channel
in int8; every activation between convolutions stays u8, quantized per tensor with a scale fixed
by calibration, so nothing is converted between layers: each convolution applies its ReLU, the
residual sum and the next layer's quantization as oneDNN post-ops. Only the last block writes fp32.

Calibration: the ranges come from one fp32 pass over the first images this encoder (as it is now)
encodes in int8, and are then fixed; a later activation beyond its calibrated maximum saturates.
`calibrate` re-runs it on images a caller picks. The input range is the one normalised [0, 1]
pixels span, so no pixel is clipped. Lossy, like the rest of int8 mode: `bench_caption.py
--quality` checks the captions against fp32's.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from mmcap.accel import twins
from mmcap.accel.folding import folded_encoder
from mmcap.images import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

QParams = tuple[float, int]  # u8 scale and zero point: real = scale * (q - zero_point)


class Unsupported(Exception):
    """The encoder is not a torchvision ResNet this module can run, or this torch has no oneDNN int8 convolutions."""


def available() -> bool:
    """Whether this torch has oneDNN's int8 convolution ops (x86 builds do)."""
    try:
        return hasattr(torch.ops.onednn, "qconv2d_pointwise") and hasattr(torch.ops.onednn, "qconv_prepack")
    except (AttributeError, RuntimeError):
        return False


def int8_encoder(encoder: nn.Module, pixels: torch.Tensor) -> "Int8ResNet":
    """`encoder`'s int8 twin, calibrated on `pixels` when first made for the encoder's current
    weights (and remade, calibrated on the `pixels` of that call, when a weight changes)."""
    def make() -> Int8ResNet:
        log.info("mmcap int8 encoder: activation ranges calibrated on %d images (mmcap.accel.int8_encoder.calibrate "
                 "redoes it on others)", len(pixels))
        return Int8ResNet(encoder, pixels)

    return twins.twin(encoder, "int8", make)


def calibrate(encoder: nn.Module, pixels: torch.Tensor) -> "Int8ResNet":
    """Calibrate `encoder`'s int8 twin on `pixels` (normalised, [B, 3, H, W]) now, replacing the
    ranges of any earlier calibration."""
    return twins.replace(encoder, "int8", Int8ResNet(encoder, pixels))


# Calibrated maxima are widened by this factor: activations beyond the maximum saturate, and that
# is what hurt. Calibrated on another data set's images (32, or a single one), the demo model's
# int8 CIDEr-D fell 2.4 % and 5.0 % with no headroom, and stayed within 0.3 % of fp32 with 2.5
# (glyphs model: within 0.1 % either way; 4 kept both within 0.4 %): 1.3 bits of resolution that
# cost nothing measurable.
HEADROOM = 2.5


def _u8(lo: float, hi: float, headroom: float = 1.0) -> QParams:
    """u8 parameters covering [lo, hi] * headroom, with 0 exactly representable."""
    lo, hi = min(lo, 0.0) * headroom, max(hi, 0.0) * headroom
    scale = max(hi - lo, 1e-8) / 255
    return scale, int(round(-lo / scale))


class _QConv:
    """One folded convolution with int8 weights (symmetric, per output channel), prepacked for
    oneDNN per input shape."""

    def __init__(self, conv: nn.Conv2d, x_q: QParams, out_q: Optional[QParams]):
        w = conv.weight.detach().float()
        self.w_scale = (w.abs().amax(dim=(1, 2, 3)) / 127).clamp_min(1e-12)
        self.w_int8 = torch.round(w / self.w_scale[:, None, None, None]).clamp_(-128, 127).to(torch.int8)
        self.w_int8 = self.w_int8.contiguous(memory_format=torch.channels_last)
        self.w_zp = torch.zeros(len(self.w_scale), dtype=torch.long)
        self.bias = conv.bias.detach().float() if conv.bias is not None else None
        self.geometry = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
        self.x_q, self.out_q = x_q, out_q  # out_q None: fp32 output
        self._packed: dict[tuple, torch.Tensor] = {}

    def _weights(self, shape: torch.Size) -> torch.Tensor:
        # oneDNN picks the weight layout for the input shape it is given (packing without it was
        # several times slower). The batch size does not matter, so one pack per image size: a
        # server's batches of 1 to 16 share it
        key = tuple(shape[1:])
        if key not in self._packed:
            self._packed[key] = torch.ops.onednn.qconv_prepack(self.w_int8, self.w_scale, *self.x_q, *self.geometry, list(shape))
        return self._packed[key]

    def __call__(self, x: torch.Tensor, relu: bool, accum: Optional[torch.Tensor] = None,
                 accum_q: QParams = (1.0, 0)) -> torch.Tensor:
        """u8 `x` -> u8 (or fp32 where `out_q` is None); `accum` is added (in place) before the ReLU."""
        out_scale, out_zp = self.out_q or (1.0, 0)
        out_dtype = None if self.out_q else torch.float32
        w = self._weights(x.shape)
        if accum is None:
            return torch.ops.onednn.qconv2d_pointwise(x, *self.x_q, w, self.w_scale, self.w_zp, self.bias, *self.geometry,
                                                      out_scale, out_zp, out_dtype, "relu" if relu else "none", [], "")
        return torch.ops.onednn.qconv2d_pointwise.binary(
            x, *self.x_q, w, self.w_scale, self.w_zp, accum, self.bias, *self.geometry, out_scale, out_zp, out_dtype,
            *accum_q, "sum", 1.0, "relu" if relu else "none", [], "")


@dataclass
class _Block:
    main: list[_QConv]  # ReLU after each; the last adds the shortcut first
    shortcut: Optional[_QConv]  # the downsample convolution, or None (identity)
    x_q: QParams  # the block's input


class Int8ResNet:
    """An int8 twin of a `ResNetEncoder` (torchvision stem, Bottleneck or BasicBlock stages):
    normalised fp32 pixels [B, 3, H, W] in, the fp32 grid out, as the encoder computes it."""

    def __init__(self, encoder: nn.Module, pixels: torch.Tensor):
        if not available():
            raise Unsupported("this torch build has no oneDNN int8 convolutions")
        twin = folded_encoder(encoder, torch.float32)
        blocks = _blocks(twin)
        ranges = _calibrate(twin, blocks, pixels)
        lo = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
        hi = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
        # the pixels' range: what normalised [0, 1] images span, widened to the calibration's
        self.x_q = _u8(min(lo, ranges["pixels"][0]), max(hi, ranges["pixels"][1]))
        stem_conv, pool = twin.stem[0], twin.stem[3]
        self.stem = _QConv(stem_conv, self.x_q, _u8(*ranges[id(stem_conv)], HEADROOM))
        self.pool = (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
        self.blocks: list[_Block] = []
        x_q = self.stem.out_q
        for i, block in enumerate(blocks):
            convs = _main_convs(block)
            main, q = [], x_q
            for conv in convs[:-1]:
                main.append(_QConv(conv, q, _u8(*ranges[id(conv)], HEADROOM)))
                q = main[-1].out_q
            last = i == len(blocks) - 1
            out_q = None if last else _u8(*ranges[id(block)], HEADROOM)
            main.append(_QConv(convs[-1], q, out_q))
            shortcut = None
            if block.downsample is not None:
                down = block.downsample[0]
                shortcut = _QConv(down, x_q, _u8(*ranges[id(down)], HEADROOM) if not last else None)
            self.blocks.append(_Block(main, shortcut, x_q))
            x_q = out_q

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        scale, zp = self.x_q
        x = pixels.float().contiguous(memory_format=torch.channels_last)
        x = (x / scale).add_(zp).round_().clamp_(0, 255).to(torch.uint8)
        x = self.stem(x, relu=True)
        x = _max_pool_u8(x, self.pool, self.stem.out_q)
        for block in self.blocks:
            h = x
            for conv in block.main[:-1]:
                h = conv(h, relu=True)
            last = block.main[-1]
            if block.shortcut is not None:
                shortcut, shortcut_q = block.shortcut(x, relu=False), block.shortcut.out_q or (1.0, 0)
            else:
                shortcut, shortcut_q = x, block.x_q  # x is not read again: the sum may overwrite it
            if last.out_q is None and shortcut.dtype == torch.uint8:  # fp32 output: the sum in fp32
                shortcut = (shortcut.float() - shortcut_q[1]) * shortcut_q[0]
                shortcut_q = (1.0, 0)
            x = last(h, relu=True, accum=shortcut, accum_q=shortcut_q)
        return x


def _max_pool_u8(x: torch.Tensor, pool: tuple, q: QParams) -> torch.Tensor:
    """Max pooling of channels-last u8 activations (the maximum commutes with the monotonic
    quantization). torch's channels-last pooling refuses u8, and its NCHW pooling is an order of
    magnitude slower than the quantized-tensor kernel, which views the same memory."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensors are deprecated; the NCHW path stays below
            y = F.max_pool2d(torch._make_per_tensor_quantized_tensor(x, *q), *pool)
        return torch.empty(0, dtype=torch.uint8).set_(y.untyped_storage(), y.storage_offset(), y.shape, y.stride())
    except (RuntimeError, AttributeError):
        return F.max_pool2d(x.contiguous(), *pool).contiguous(memory_format=torch.channels_last)


def _blocks(twin: nn.Module) -> list[nn.Module]:
    """The residual blocks of a folded `ResNetEncoder`, in order; Unsupported for anything else."""
    stem = getattr(twin, "stem", None)
    if not (isinstance(stem, nn.Sequential) and len(stem) == 4 and isinstance(stem[0], nn.Conv2d)
            and isinstance(stem[2], nn.ReLU) and isinstance(stem[3], nn.MaxPool2d)):
        raise Unsupported("the encoder's stem is not a torchvision ResNet's (conv, bn, relu, maxpool)")
    blocks = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        stage = getattr(twin, name, None)
        if isinstance(stage, nn.Identity):
            continue
        for block in stage:
            if not isinstance(block, (Bottleneck, BasicBlock)):
                raise Unsupported(f"{name} holds a {type(block).__name__}, not a torchvision Bottleneck or BasicBlock")
            if any(not isinstance(getattr(block, f"bn{j}"), nn.Identity) for j in range(1, len(_main_convs(block)) + 1)):
                raise Unsupported(f"{name} has a BatchNorm that is not folded")
            if block.downsample is not None and not (len(block.downsample) == 2 and isinstance(block.downsample[1], nn.Identity)):
                raise Unsupported(f"{name} has a downsample branch that is not a folded (conv, bn)")
            blocks.append(block)
    if not blocks:
        raise Unsupported("the encoder has no residual blocks")
    return blocks


def _main_convs(block: nn.Module) -> list[nn.Conv2d]:
    return [block.conv1, block.conv2, block.conv3] if isinstance(block, Bottleneck) else [block.conv1, block.conv2]


@torch.no_grad()
def _calibrate(twin: nn.Module, blocks: list[nn.Module], pixels: torch.Tensor) -> dict:
    """Ranges (min, max) of the fp32 twin's activations on `pixels`: the stem convolution's and
    every main-path convolution's output after its ReLU, each downsample's output, each block's
    output; keyed by `id(module)`."""
    ranges: dict = {}

    def record(module, after_relu):
        def hook(_, __, out):
            lo, hi = (0.0 if after_relu else float(out.min())), float(out.max())
            ranges[id(module)] = (lo, max(hi, 0.0) if after_relu else hi)
        return module.register_forward_hook(hook)

    hooks = [record(twin.stem[0], True)]
    for block in blocks:
        hooks += [record(conv, True) for conv in _main_convs(block)[:-1]]
        hooks.append(record(block, True))
        if block.downsample is not None:
            hooks.append(record(block.downsample[0], False))
    try:
        x = pixels.detach().to("cpu", torch.float32)
        ranges["pixels"] = (float(x.min()), float(x.max()))
        with torch.autocast("cpu", enabled=False):
            twin(x.contiguous(memory_format=torch.channels_last))
    finally:
        for h in hooks:
            h.remove()
    return ranges
