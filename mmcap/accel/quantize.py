"""`precision="int8"`: the decoder's linear layers and LM head in int8 on CPUs, for captioning.

Decoding a caption multiplies every decoder weight by a handful of rows per generated token (16
images x 3 beams = 48), so a step reads every weight once: the weights' bytes set its pace. int8
weights (symmetric, per output channel) read a quarter of fp32's; the rows are quantized per call
(dynamic quantization). Three kernels multiply int8 by int8: torch's x86 quantized engines fbgemm
and oneDNN (activations per call), and mmcap's own (`csrc/int8_matmul.cpp`, activations per row),
which streams the packed weights once through AMX tiles on CPUs with AMX, or through AVX-512 VNNI
on CPUs with AVX-512 but no AMX (the same int32 sums, so the same outputs). They are timed
against each other once per weight shape and machine (`mmcap.accel.timing`); another engine
replaces fbgemm only where it measured at least 10 % faster (timings a few percent apart flip
between runs); where mmcap's kernel runs, it is the one kept unless clearly beaten (its fused
LayerNorm, GELU and residual are not in the race). Figures: docs/performance.md.

Int8 changes the numbers, so it is never chosen by `auto`: callers ask for it. The weights stay as
they are; `int8_linears(module)` swaps int8 twins in for the duration of a call (made once and
remade when a weight changes, e.g. after more training) and puts the originals back. Where torch
has no x86 quantized engine, the twins multiply with `torch._int_mm` instead (slower: the scales
are applied apart); on GPUs `int8_available` is False and callers fall back to `auto`.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from typing import Callable, Iterator, Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from mmcap.accel import kernels, timing, twins

log = logging.getLogger(__name__)

_ENGINES = ("x86", "fbgemm", "onednn")
try:  # the overload itself: no lookup per call
    _linear_dynamic = torch.ops.quantized.linear_dynamic.default
except (AttributeError, RuntimeError):  # pragma: no cover - torch builds without quantized ops (nothing gets packed)
    _linear_dynamic = None
# The engines' own kernels, timed against each other per weight shape: neither wins everywhere (on
# one CPU oneDNN ran GPT-2's LM head twice as fast as fbgemm, while fbgemm won at 768 x 768).
_CANDIDATES = ("fbgemm", "onednn")  # the first is kept unless another is clearly faster
AMX = "amx"  # mmcap's kernel (`mmcap.accel.kernels`), a candidate where the CPU has AMX
VNNI = "vnni"  # the same kernel on AVX-512 VNNI: a candidate where the CPU has that but no AMX
ENGINE_MIN_SPEEDUP = 1.1  # timings a few percent apart flip between runs: keep the first there
# Against mmcap's kernel another engine must be clearly faster: the race times one weight in cache
# and none of the LayerNorm, GELU and residual add the kernel does around a layer. In a whole decode
# (benchmarks/bench_decode_rows.py) every layer on AMX took 530 ms a batch against oneDNN's 677,
# while single-shape races came within 10 % and flipped between processes.
AMX_MIN_SPEEDUP = 1.25
TIMING_ROWS = 48  # rows per call while timing: 16 images x 3 beams, a decoding step of `caption`'s default batch


@functools.lru_cache(maxsize=None)
def int8_engine() -> Optional[str]:
    """The x86 quantized engine this torch build runs on this CPU, or None."""
    supported = torch.backends.quantized.supported_engines
    for engine in _ENGINES:
        if engine in supported:
            return engine
    return None


def _candidate_engines() -> tuple[str, ...]:
    """The engines to time against each other: torch's x86 quantized engines (none where this torch
    has none), and mmcap's kernel: on AMX where the CPU has it, else on AVX-512 VNNI where it has that."""
    if int8_engine() is None:
        return ()
    supported = torch.backends.quantized.supported_engines
    own = (AMX,) if amx_available() else (VNNI,) if vnni_available() else ()
    return (tuple(e for e in _CANDIDATES if e in supported) or (int8_engine(),)) + own


def preferred_engine(engines: tuple[str, ...]) -> str:
    """The engine kept unless another times clearly faster: mmcap's kernel where it runs (by
    `AMX_MIN_SPEEDUP`), else the first of torch's engines (by `ENGINE_MIN_SPEEDUP`)."""
    return next((e for e in (AMX, VNNI) if e in engines), engines[0])


@functools.lru_cache(maxsize=None)
def amx_available() -> bool:
    """Whether mmcap's AMX int8 kernel runs here (built for this CPU, which has AMX, and the OS allows it)."""
    return _kernels_say("amx_int8")


@functools.lru_cache(maxsize=None)
def vnni_available() -> bool:
    """Whether mmcap's int8 kernel runs here on AVX-512 VNNI (built for this CPU, which has it)."""
    return _kernels_say("vnni_int8")


def _kernels_say(question: str) -> bool:
    ops = kernels.kernels()
    try:
        return ops is not None and bool(getattr(ops, question)())
    except (RuntimeError, AttributeError):  # pragma: no cover - a build without the operator
        return False


def int8_available(device: torch.device | str = "cpu") -> bool:
    """Whether `precision="int8"` runs int8 on `device` (CPUs); else callers fall back."""
    return torch.device(device).type == "cpu"


class Int8Linear(nn.Module):
    """y = x W^T + b with W in int8 (symmetric, per output channel) and x quantized per call."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        """`weight` [out, in] as nn.Linear stores it."""
        super().__init__()
        w = weight.detach().float()
        self.out_features = w.shape[0]
        scales = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
        qweight = (w / scales[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        self.bias = None if bias is None else bias.detach().float()
        self.engine, self._packed = _prepack(qweight, scales, self.bias)
        # the plain int8 weight only where the engine's packed copy is missing: one copy in memory
        self.qweight, self.scales = (None, None) if self._packed is not None else (qweight, scales)
        self._top = getattr(self._packed, "top", None)
        if self.engine not in (AMX, VNNI):  # the LayerNorm before the layer, what follows it: mmcap's kernel only
            self.fused = None
        if self._top is None:
            self.head_top = None

    def fused(self, h: torch.Tensor, norm: Optional[nn.Module] = None, gelu: bool = False,
              residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """residual + gelu(self(norm(h))), each part where given, in one call: the rows LayerNorm-ed
        as they are quantized, GPT-2's tanh GELU and the residual added as the outputs are written."""
        # a decoding step's rows (2-D, fp32) go straight through: this runs 73 times a GPT-2 step
        shape = h.shape
        rows = h if h.dim() == 2 and h.dtype == torch.float32 else h.reshape(-1, shape[-1]).float()
        if residual is not None and (residual.dim() != 2 or residual.dtype != torch.float32):
            residual = residual.reshape(-1, self.out_features).float()
        rows, norm_args = _normed(rows, norm)
        y = self._packed(rows, residual, gelu, *norm_args)
        return y if h.dim() == 2 else y.reshape(*shape[:-1], self.out_features)

    def head_top(self, h: torch.Tensor, k: int, norm: Optional[nn.Module] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """log_softmax(self(norm(h)))'s k best values of each row, best first, and their columns,
        in one call that never writes the [rows, out] outputs: an LM head and beam search's top k
        (`torch.ops.mmcap.int8_linear_top`)."""
        rows, norm_args = _normed(h.reshape(-1, h.shape[-1]).float(), norm)
        return self._top(rows, k, *norm_args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None and x.dim() == 2:  # a decoding step's rows: the kernel alone
            return self._packed(x.float())
        shape = x.shape
        x = x.reshape(-1, shape[-1]).float()
        if self._packed is not None:  # the engine's kernel: one fused call
            y = self._packed(x)
        else:  # torch's int8 matmul, then the scales
            xs = x.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12).div_(127.0)
            y = torch._int_mm(torch.round(x / xs).to(torch.int8), self.qweight.t()).float().mul_(xs).mul_(self.scales)
            if self.bias is not None:
                y.add_(self.bias)
        return y.reshape(*shape[:-1], self.out_features)

    # Called straight, without nn.Module's hook machinery: these twins live only inside
    # `int8_linears` and carry no hooks. A decoding step makes ~1,500 such calls per batch; the
    # hooks' bookkeeping and the op packet's dispatch cost ~5 us each (1 % of int8 decoding).
    __call__ = forward


def _normed(rows: torch.Tensor, norm: Optional[nn.Module]) -> tuple[torch.Tensor, tuple]:
    """`rows` and the LayerNorm arguments (weight, bias, eps) mmcap's kernel applies as it quantizes
    them; a norm the kernel does not do (another kind, or without weight or bias) runs here, in torch."""
    if norm is None:
        return rows, ()
    params = norm._parameters  # not nn.Module's attribute lookup: this runs 73 times a GPT-2 step
    weight, bias = params.get("weight"), params.get("bias")
    if isinstance(norm, nn.LayerNorm) and weight is not None and bias is not None:
        if torch.is_grad_enabled():
            weight, bias = weight.detach(), bias.detach()
        return rows, (weight, bias, norm.eps)
    return norm(rows).float(), ()


def _prepack(qweight: torch.Tensor, scales: torch.Tensor,
             bias: Optional[torch.Tensor]) -> tuple[Optional[str], Optional[Callable[[torch.Tensor], torch.Tensor]]]:
    """(engine, its kernel on this weight: fp32 rows [M, in] -> [M, out]) for the engine that
    measured fastest for this shape, or (None, None) where there is none (torch's quantized tensors
    are deprecated; then `Int8Linear` multiplies with `torch._int_mm`)."""
    engines = _candidate_engines()
    if not engines:
        return None, None
    try:
        shape = tuple(qweight.shape)
        runs = {}

        def race() -> dict[str, float]:
            runs.update({e: _kernel(e, qweight, scales, bias) for e in engines})
            x = torch.randn(TIMING_ROWS, shape[1])
            return timing.time_calls({e: functools.partial(run, x) for e, run in runs.items()})

        prefer = preferred_engine(engines)
        engine = timing.fastest(f"int8 linear {shape[0]} x {shape[1]}, {TIMING_ROWS} rows", engines, race,
                                prefer=prefer, margin=AMX_MIN_SPEEDUP if prefer in (AMX, VNNI) else ENGINE_MIN_SPEEDUP)
        return engine, runs[engine] if engine in runs else _kernel(engine, qweight, scales, bias)
    except (RuntimeError, AttributeError) as e:  # pragma: no cover - torch builds without the engine
        log.info("mmcap int8: the quantized engine is unavailable (%s): using torch._int_mm", e)
        return None, None


def _kernel(engine: str, qweight: torch.Tensor, scales: torch.Tensor,
            bias: Optional[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """`engine`'s kernel with the weight packed for it."""
    if engine in (AMX, VNNI):  # mmcap's own (`csrc/int8_matmul.cpp`): the same rounding of the weight, x per row
        ops, n = kernels.kernels(), qweight.shape[0]
        packed, scales = ops.int8_pack(qweight), scales.float().contiguous()
        colsum = _column_sums(qweight) if engine == VNNI else None  # given it, the kernel runs on VNNI

        def run(x, residual=None, gelu=False, weight=None, norm_bias=None, eps=1e-5):
            return ops.int8_linear(x, packed, scales, bias, n, residual, gelu, weight, norm_bias, eps, colsum)

        top = getattr(ops, "int8_linear_top", None)
        if top is not None:  # the layer's outputs' log-softmax top k, the outputs never written
            run.top = lambda x, k, weight=None, norm_bias=None, eps=1e-5: top(x, packed, scales, bias, n, k, weight,
                                                                              norm_bias, eps, colsum)
        return run
    packed = _pack(engine, qweight, scales, bias)
    return lambda x: _linear_dynamic(x, packed, True)


def _column_sums(qweight: torch.Tensor) -> torch.Tensor:
    """The int8 weight's sum per output column, int32, zero-padded to whole 16-column blocks: the
    VNNI kernel takes 128 x these off its sums (it multiplies the rows as q + 128)."""
    n = qweight.shape[0]
    sums = torch.zeros(-(-n // 16) * 16, dtype=torch.int32)
    sums[:n] = qweight.sum(dim=1, dtype=torch.int32)
    return sums


def _pack(engine: str, qweight: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor]):
    with warnings.catch_warnings():  # the deprecation of quantized tensors; the fallback is ready
        warnings.simplefilter("ignore")
        zero = torch.zeros(len(scales), dtype=torch.long)
        q = torch._make_per_channel_quantized_tensor(qweight, scales.double(), zero, axis=0)
        with _engine(engine):
            return torch.ops.quantized.linear_prepack(q, bias)


@contextlib.contextmanager
def _engine(wanted: str) -> Iterator[None]:
    """torch's quantized engine set to `wanted` within the block (prepacking packs for it)."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = wanted
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def _twin(module: nn.Module) -> Optional[Int8Linear]:
    if isinstance(module, nn.Linear):
        return Int8Linear(module.weight, module.bias)
    if isinstance(module, Conv1D):  # transformers' GPT-2 layers: weight stored [in, out]
        return Int8Linear(module.weight.t(), module.bias)
    return None


def _twins(model: nn.Module) -> dict[str, Int8Linear]:
    """The int8 twin of every linear layer of `model` (`mmcap.accel.twins`: remade when its weights change)."""
    return {name: twins.twin(module, "int8", functools.partial(_twin, module)) for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, Conv1D))}


@contextlib.contextmanager
def int8_linears(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every nn.Linear (and GPT-2 Conv1D) of `model` computes in int8."""
    twins = _twins(model)
    swapped = []
    try:
        for name, twin in twins.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            swapped.append((parent, child, getattr(parent, child)))
            setattr(parent, child, twin)
        yield model
    finally:
        for parent, child, original in reversed(swapped):
            setattr(parent, child, original)
