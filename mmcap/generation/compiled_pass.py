"""GPT-2's lean pass with every step after the first as one compiled graph: on GPUs, a CUDA graph.

Why: on a GPU, a decoding step of GPT-2 small is a few hundred small kernels, and launching them
costs the host more time than the GPU spends on them (`bench_gpu.py`: captioning at batch 16 ran
1.2x the naive pipeline, bound by the host). A step whose tensors keep their shapes and addresses
(the static cache, `static_cache`), whose position lives on the device and whose beam reorder is
a gather inside the step, compiles to one graph with nothing read from Python that changes;
`torch.compile(mode="reduce-overhead")` then replays it as a CUDA graph, one launch per token.

What changes for the search: images stay in the pass until the last one is done (`static_rows`:
dropping finished images would change the shapes, and every new shape is a new graph), with the
same results. The first call (BOS and the prompt, before beams expand) runs eagerly. The step's
buffers are kept per shape and reused by the next pass (`_POOL`), so that batch after batch the
graph sees the same addresses and is replayed, not recorded again.
"""
from __future__ import annotations

import threading
import weakref
from typing import Optional, Union

import torch

from mmcap.config import compile_kwargs
from mmcap.generation.attention import ImageKV
from mmcap.generation.gpt2_pass import GPT2Decoding
from mmcap.generation.static_cache import StaticAttention

# torch.compile's options where a caller says only "compile": CUDA graphs on GPUs (reduce-overhead),
# one graph or an error (fullgraph), shapes as first seen (a pass's shapes do not change)
DEFAULT_OPTIONS = {"fullgraph": True, "dynamic": False}
GPU_OPTIONS = {"mode": "reduce-overhead"}


def compile_options(setting: Union[bool, dict], device: torch.device) -> Optional[dict]:
    """torch.compile's keyword arguments for a `compile_decoder` setting (None: off). `True` means
    the defaults for `device`; a mapping is passed on, over those defaults."""
    options = compile_kwargs(setting, "compile_decoder")
    if options is None:
        return None
    return {**DEFAULT_OPTIONS, **(GPU_OPTIONS if torch.device(device).type == "cuda" else {}), **options}


class CompiledStaticAttention:
    """An `AttentionBackend` whose passes compile their steps (`decoding_pass` reads
    `compile_options`): static caches, the position and beam reorders on the device."""

    def __init__(self, options: dict):
        self.compile_options = dict(options)

    def __call__(self, image_kv: ImageKV, heads: int, max_len: int, autocast: bool = False) -> "DeviceStepAttention":
        return DeviceStepAttention(heads, image_kv, max_len)  # caches in the dtype the linear layers give

    def __repr__(self) -> str:
        return f"CompiledStaticAttention({self.compile_options})"


class DeviceStepAttention(StaticAttention):
    """`StaticAttention` whose compiled steps read nothing from Python that changes: the position
    (`pos`), the mask (`bias`) and the pending beam reorder (`pending`) are device tensors that the
    step updates in place."""

    def __init__(self, heads: int, image_kv: ImageKV, max_len: int, dtype: Optional[torch.dtype] = None):
        super().__init__(heads, image_kv, max_len, dtype)
        self.pending: Optional[torch.Tensor] = None  # [rows] long: row r continues from row pending[r]
        self.identity: Optional[torch.Tensor] = None
        self.on_device = False

    def start_device_steps(self, buffers: "StepBuffers", t: int) -> None:
        """Move the caches and mask into `buffers` (reused pass after pass), the next step at
        position `t`: from now on the compiled steps run (`device_step_begin`, `device_step_end`)."""
        self._apply_reorder()
        for dst, src in zip(buffers.kv, self.kv):
            dst.copy_(src)
        buffers.pos.fill_(t)
        buffers.bias.copy_(self.bias)
        buffers.pending.copy_(buffers.identity)
        for dst, src in zip(buffers.cross, self.cross):
            for d, s in zip(dst, src):
                d.copy_(s)
        self.kv, self.pos, self.bias, self.cross = list(buffers.kv), buffers.pos, buffers.bias, list(buffers.cross)
        self.pending, self.identity, self.step_rows, self.on_device = buffers.pending, buffers.identity, None, True

    def device_step_begin(self) -> None:
        """(Inside the graph) the pending reorder applied to every layer's cache; the mask opened
        at this position."""
        for kv in self.kv:
            kv.copy_(kv.index_select(1, self.pending))
        self.pending.copy_(self.identity)
        self.bias.index_fill_(0, self.pos, 0.0)

    def device_step_end(self) -> None:
        self.pos.add_(1)

    def reorder(self, rows: torch.Tensor) -> None:
        if not self.on_device:
            return super().reorder(rows)
        self.pending.copy_(self.pending.index_select(0, rows.to(self.pending.device)))

    def expand(self, k: int) -> None:
        if self.on_device:
            raise RuntimeError("a compiled pass expands its rows before its device steps start")
        super().expand(k)

    def keep(self, images: torch.Tensor) -> None:
        raise RuntimeError("a compiled pass keeps every image to the end (static_rows): new shapes would be new graphs")


class StepBuffers:
    """Every tensor a compiled step reads or writes in place, for one shape: the caches, the
    position, the mask, the pending reorder and the image's keys and values."""

    def __init__(self, state: DeviceStepAttention):
        self.kv = [torch.zeros_like(kv) for kv in state.kv]
        self.pos, self.bias = torch.zeros_like(state.pos), torch.zeros_like(state.bias)
        rows = state.kv[0].shape[1]
        self.identity = torch.arange(rows, device=self.pos.device)
        self.pending = self.identity.clone()
        self.cross = [tuple(torch.zeros_like(t) for t in per_image) for per_image in state.cross]
        for t in (*self.kv, self.pos, self.bias, self.identity, self.pending, *(t for c in self.cross for t in c)):
            # the same addresses every call: CUDA graphs replay on them (no guard: a new pass of the
            # same shape takes these buffers, so the addresses do not change)
            torch._dynamo.mark_static_address(t, guard=False)

    @staticmethod
    def key(state: DeviceStepAttention) -> tuple:
        return (tuple((tuple(kv.shape), kv.dtype, kv.device) for kv in state.kv),
                tuple(tuple((tuple(t.shape), t.dtype) for t in c) for c in state.cross), state.bias.dtype)


class _Pool:
    """Step buffers by shape, lent to one pass at a time and returned when the pass is freed."""

    def __init__(self):
        self._free: dict[tuple, list[StepBuffers]] = {}
        self._lock = threading.Lock()

    def take(self, state: DeviceStepAttention, owner: object) -> StepBuffers:
        key = StepBuffers.key(state)
        with self._lock:
            free = self._free.get(key)
            buffers = free.pop() if free else None
        if buffers is None:
            buffers = StepBuffers(state)
        weakref.finalize(owner, self._give_back, key, buffers)
        return buffers

    def _give_back(self, key: tuple, buffers: StepBuffers) -> None:
        with self._lock:
            self._free.setdefault(key, []).append(buffers)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


_POOL = _Pool()


class CompiledGPT2Decoding(GPT2Decoding):
    """`GPT2Decoding` whose steps after the first run as one compiled function (module docstring)."""

    static_rows = True  # the searches keep every image's rows to the end: no `keep`

    def __init__(self, model, memory: torch.Tensor, max_len: int, attention: CompiledStaticAttention):
        super().__init__(model, memory, max_len, attention=attention)
        if not isinstance(self.attention, DeviceStepAttention):
            raise TypeError(f"a compiled pass needs DeviceStepAttention, got {type(self.attention).__name__}")
        self._step_fn = _compiled_step(attention.compile_options)

    def __call__(self, seqs: torch.Tensor, top: bool = False) -> tuple[torch.Tensor, None]:
        if self.t == 0 or seqs.shape[1] != self.t + 1:  # BOS and the prompt: eagerly, as the lean pass
            return super().__call__(seqs, top)
        if seqs.shape[1] > self.max_len:
            raise ValueError(f"cannot decode past the {self.max_len} positions this pass was made for")
        att = self.attention
        if not att.on_device:  # the pool takes its buffers back once this pass is freed
            att.start_device_steps(_POOL.take(att, self), self.t)
        if seqs.device.type == "cuda":  # the last step's outputs are read: a new CUDA graph run starts
            torch.compiler.cudagraph_mark_step_begin()
        logits = self._step_fn(self, seqs[:, -1].contiguous())
        self.t += 1
        # a CUDA graph's outputs live in its memory pool until the next replay; the searches write
        # into the logits (an in-place log-softmax), so they get their own copy
        return (logits.clone() if logits.device.type == "cuda" else logits), None


def _device_step(dec: CompiledGPT2Decoding, tokens: torch.Tensor) -> torch.Tensor:
    """One step of `dec` at its device position: logits [N, V] fp32. What torch.compile traces."""
    att = dec.attention
    att.device_step_begin()
    x = dec.body.wte(tokens) + dec.body.wpe(att.pos)
    x = dec._layers(x)
    att.device_step_end()
    return dec._head(x, False)


_COMPILED: dict[str, object] = {}


def _compiled_step(options: dict):
    """`_device_step` compiled with `options`, once per process and options: each pass is a new
    object, and a new compiled function per pass would compile again. (Keyed by the options' repr:
    torch.compile's own `options=` is a dict, which cannot be hashed.)"""
    key = repr(sorted(options.items()))
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(_device_step, **options)
    return _COMPILED[key]
