"""The inference plan: what one `precision` means on one device, resolved once per call.

`Captioner.caption`, `caption_stream`, `mmcap serve` and feature extraction take a `precision`
("fp32", "bf16", "auto" or "int8") and resolve it here, once, into an `InferencePlan`; everything
downstream applies the plan and never reads the string again. The plan holds:
- the compute dtype: bf16 for "bf16", and for "auto"/"int8" where bf16 measured faster (`precision`);
- the encoder runner: the model's own modules in fp32 (exactly the reference pipeline), else the
  folded twin, and in int8 mode on CPUs the fastest of the folded, int8 and ONNX Runtime runners;
- whether the decoder's linear layers, and the projection's, run in int8 (CPUs; on GPUs "int8"
  falls back to "auto");
- the attention backend handed to generation: C++ kernels where they timed faster (lossy modes);
- whether glibc keeps freed memory for the next batch (CPUs, the fast modes);
- whether GPT-2's decoding steps run compiled (`compile_decoder`: CUDA graphs on GPUs; off by default).
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from mmcap.accel.allocator import keep_freed_memory
from mmcap.accel.encoder_race import fastest_encoder
from mmcap.accel.folding import folded_encoder
from mmcap.accel.kernel_attention import RacedAttention, refill_attention
from mmcap.accel.precision import PRECISIONS, bf16_is_fast, check_precision
from mmcap.accel.quantize import int8_available, int8_linears
from mmcap.generation.attention import AttentionBackend
from mmcap.generation.compiled_pass import CompiledStaticAttention, compile_options

log = logging.getLogger(__name__)

__all__ = ["InferencePlan", "PRECISIONS", "as_plan"]


@dataclass(frozen=True)
class InferencePlan:
    precision: str  # as asked: fp32, bf16, auto or int8
    device: torch.device
    dtype: torch.dtype  # what autocast and the encoder's twin compute in
    int8_decoder: bool  # the decoder's linear layers and LM head in int8
    tune_allocator: bool  # glibc keeps freed memory for the next batch (`allocator`)
    # torch.compile's options for GPT-2's decoding steps (`mmcap.generation.compiled_pass`), or None
    compile_decoder: Optional[dict] = field(default=None, hash=False)

    @classmethod
    def resolve(cls, precision: str, device: Union[str, torch.device] = "cpu",
                compile_decoder: Union[bool, dict] = False) -> "InferencePlan":
        """The plan for `precision` on `device`: measures (or reads this machine's cached
        measurement of) whether bf16 pays. `compile_decoder` (True, or a mapping of torch.compile
        options) compiles GPT-2's decoding steps over a static cache: on GPUs they replay as CUDA
        graphs (`mode="reduce-overhead"`); not with int8 decoding, whose kernels are already one
        call per layer."""
        check_precision(precision)
        device = torch.device(device)
        fast = precision == "bf16" or (precision in ("auto", "int8") and bf16_is_fast(device))
        int8 = precision == "int8" and int8_available(device)
        if precision == "int8" and not int8:
            _warn_no_int8(str(device))
        options = compile_options(compile_decoder, device)
        if options is not None and int8:
            raise ValueError("compile_decoder: int8 decoding runs mmcap's CPU kernels, which torch.compile does not "
                             "trace; use precision fp32, bf16 or auto with it")
        return cls(precision, device, torch.bfloat16 if fast else torch.float32, int8,
                   tune_allocator=precision != "fp32" and device.type == "cpu", compile_decoder=options)

    @property
    def exact(self) -> bool:
        """Whether this plan computes what the reference fp32 pipeline computes."""
        return self.dtype == torch.float32 and not self.int8_decoder

    @property
    def draft(self) -> bool:
        """Whether large JPEGs may decode at a reduced scale (never below the model's image size)."""
        return self.dtype != torch.float32

    @property
    def attention(self) -> AttentionBackend:
        """The attention backend for GPT-2's lean pass: int8 keeps its caches (`cache_dtype`) and the
        image's keys and values (`image_dtype`) in int8; with `compile_decoder`, static caches in
        torch's ops, compiled with the step."""
        if self.compile_decoder is not None:
            return CompiledStaticAttention(self.compile_decoder)
        return RacedAttention(self.cache_dtype if self.int8_decoder else None, self.image_dtype)

    @property
    def cache_dtype(self) -> torch.dtype:
        """The self-attention caches' dtype in mmcap's kernels: int8 with an int8 decoder (each key
        and value vector with a scale of its own), whatever the compute dtype, else the compute dtype.
        Every decoding step reads the caches from memory: in a batch of 16 at bench_caption's shape,
        self-attention took 33-35 ms on bf16 caches and 20-21 on int8 (AMX Xeon), and fp32 caches
        cost an emulated Xeon without AMX about 20 ms more than bf16."""
        return torch.int8 if self.int8_decoder else self.dtype

    @property
    def image_dtype(self) -> Optional[torch.dtype]:
        """The dtype of the image's keys and values in mmcap's attention kernels: int8 with an int8
        decoder (every decoding step reads them all: half bf16's bytes), else the caches'."""
        return torch.int8 if self.int8_decoder else None

    def refill_attention(self, head_dim: int) -> Optional[AttentionBackend]:
        """The attention backend for slot refill (rows at their own positions: mmcap's kernels,
        caches in the compute dtype), or None where the kernels cannot run."""
        if self.device.type != "cpu" or self.compile_decoder is not None:
            return None
        return refill_attention(head_dim, self.cache_dtype, self.image_dtype)

    def prepare(self) -> None:
        """Process-wide settings the plan asks for (once per process)."""
        if self.tune_allocator:
            keep_freed_memory()

    def computing(self) -> contextlib.AbstractContextManager:
        """Autocast to the compute dtype unless fp32. Weights are cast once per outermost context
        (autocast caches the casts of parameters that require grad): open one around all batches."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def keeping_cast_weights(self) -> contextlib.AbstractContextManager:
        """Between batches of a stream: keeps autocast's cache of cast weights alive (it is dropped
        when the outermost autocast context exits) while leaving autocast as it was, so that the
        caller's code between batches runs as it would anyway."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        kind = self.device.type
        return torch.autocast(kind, dtype=torch.get_autocast_dtype(kind), enabled=torch.is_autocast_enabled(kind))

    def encode(self, encoder: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """The encoder's grid of normalised `pixels`, by the runner this plan uses (module docstring)."""
        if self.exact or encoder.training:
            return encoder(pixels.to(self.device, next(encoder.parameters()).dtype))
        pixels = pixels.to(self.device)
        if self.int8_decoder:  # (CPUs only)
            return fastest_encoder(encoder, self.dtype, pixels)(pixels)
        return folded_encoder(encoder, self.dtype)(pixels.to(self.dtype).contiguous(memory_format=torch.channels_last))

    def project(self, projection: nn.Module, grid: torch.Tensor) -> torch.Tensor:
        """The image tokens of an encoder `grid`, by `projection` (the captioner's): with an int8
        decoder its linear layers in int8 too. At bench_caption's shape (16 images, 784 x 2048 ->
        768) that took 2.7 ms against 8 in fp32 on an emulated Xeon without AMX (bf16 is slow
        there), and 1.1 against 2.9 in bf16 with AMX; the tokens' relative error, 0.9 %, is the
        decoder's own layers' kind."""
        if not self.int8_decoder or projection.training:
            return projection(grid)
        with int8_linears(projection):
            return projection(grid)

    @contextlib.contextmanager
    def decoding(self, decoder: nn.Module, memory: torch.Tensor):
        """Within the block, `decoder` computes as the plan says; yields the image tokens to decode
        from. int8: its linear layers in int8, the rest of it in fp32 (no autocast) but GPT-2's
        attention, in the compute dtype (`attention`)."""
        if not self.int8_decoder:
            yield memory
            return
        with torch.autocast(self.device.type, enabled=False), int8_linears(decoder):
            yield memory.float()


def as_plan(precision: Union[str, InferencePlan], device: Union[str, torch.device] = "cpu",
            compile_decoder: Union[bool, dict] = False) -> InferencePlan:
    """`precision` resolved for `device`, or the plan itself where one is given."""
    if isinstance(precision, InferencePlan):
        return precision
    return InferencePlan.resolve(precision, device, compile_decoder)


@functools.lru_cache(maxsize=None)
def _warn_no_int8(device: str) -> None:
    log.warning("mmcap precision: int8 runs on CPUs, not on %s: it falls back to auto there", device)
