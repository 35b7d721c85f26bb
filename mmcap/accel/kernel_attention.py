"""GPT-2's attention in mmcap's C++ kernels (`mmcap.accel.kernels`), and the backend the inference
plan hands to generation: the kernels where the caller accepts other rounding and they timed faster
than torch's ops on this machine, else torch's (`mmcap.generation.attention.TorchAttention`).

`KernelAttention` keeps preallocated caches read through a row table, so that a beam reorder copies
no keys, and makes one call per layer for each attention. It computes in fp32 whatever the caches
hold (other rounding than torch's chain of ops), so only the lossy modes use it: int8, and bf16 autocast.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import torch

from mmcap.accel import kernels as compiled
from mmcap.accel import timing
from mmcap.generation.attention import AttentionBackend, AttentionState, ImageKV, TorchAttention

log = logging.getLogger(__name__)

TIMING = dict(images=16, beams=3, positions=12, image_positions=49)  # `caption`'s default batch, beam 3


class KernelAttention(AttentionState):
    """Attention in mmcap's C++ kernels, caches in `dtype` (fp32, bf16, or int8 with a scale per key
    and value vector), arithmetic in fp32.

    The self-attention cache of a layer is [rows, heads, max_len, head_dim], allocated at the first
    step and grown once when beam search expands rows into beams; row n's position p is read from
    cache row `anc[n, p]` (its ancestor's row at that position). A step writes each row's new key
    and value at its own row, so a beam reorder or a dropped image only re-indexes `anc`: nothing
    is copied.
    """

    def __init__(self, heads: int, image_kv: ImageKV, dtype: torch.dtype, max_len: int, kernels=None,
                 image_dtype: Optional[torch.dtype] = None):
        """`image_dtype` (default `dtype`): the image's keys and values; torch.int8 quantizes each
        key channel and each value row of an image on its own (half the bytes of bf16, which every
        step reads)."""
        super().__init__(heads, dtype)
        self.max_len = max_len
        self.kernels = kernels or compiled.kernels()
        self.log_softmax_top = getattr(self.kernels, "log_softmax_top", None)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.k_scale: list[torch.Tensor] = []  # int8 caches: [rows, heads, max_len] per layer
        self.v_scale: list[torch.Tensor] = []
        self.anc: Optional[torch.Tensor] = None  # [rows, max_len] cache rows
        self.lens: Optional[torch.Tensor] = None  # [rows] positions per row, where rows differ (`begin_rows`)
        image_dtype = image_dtype or dtype
        slots = None
        for k, v in image_kv:  # each layer packed as it is made (`LayerImageKV`), while in cache
            b, m, w = k.shape
            self.positions, padded = m, -(-m // 16) * 16  # whole vectors of positions, whatever their width
            d = w // heads
            # keys [B, heads, head_dim, MP] (transposed), values [B, heads, MP, head_dim]
            cross = [torch.empty((b, heads, d, padded), dtype=image_dtype), torch.empty((b, heads, padded, d), dtype=image_dtype)]
            if image_dtype == torch.int8:  # and their scales, per key channel and per value row
                cross += [torch.empty((b, heads, d)), torch.empty((b, heads, padded))]
            self.cross.append(tuple(cross))
            slots = torch.arange(b) if slots is None else slots
            self.kernels.pack_image_kv(k.float(), v.float(), slots, *cross)

    def begin(self, t: int, n: int) -> None:
        self._caches(n)
        self.t, self.lens = t, None
        self.anc[:, t] = self.own[:n]  # each row writes its new key and value at its own cache row

    def begin_rows(self, positions: torch.Tensor) -> None:
        """A step where row r writes position `positions[r]` (rows of a refilled slot start again at 0)."""
        n = len(positions)
        self._caches(n)
        self.anc[self.own[:n], positions] = self.own[:n]
        self.lens = positions + 1

    def admit(self, slots: torch.Tensor, image_kv: ImageKV) -> None:
        """The keys and values of the images in `slots` [n] from now on (`image_kv`: per layer,
        [n, M, width] each): transposed, cast (or quantized) and padded in one pass per layer."""
        for cross, (k, v) in zip(self.cross, image_kv):
            self.kernels.pack_image_kv(k.float(), v.float(), slots, *cross)

    def _caches(self, n: int) -> None:
        if self.anc is None:  # the first step: caches for its rows
            shape = (n, self.heads, self.max_len, self.cross[0][1].shape[-1])
            self.k = [torch.empty(shape, dtype=self.dtype) for _ in self.cross]
            self.v = [torch.empty(shape, dtype=self.dtype) for _ in self.cross]
            if self.dtype == torch.int8:  # a scale per key and value vector
                self.k_scale = [torch.empty(shape[:3]) for _ in self.cross]
                self.v_scale = [torch.empty(shape[:3]) for _ in self.cross]
            self.anc = torch.empty(n, self.max_len, dtype=torch.long)
            self.own = torch.arange(n)

    def self_attention(self, i: int, qkv: torch.Tensor, scale: float) -> torch.Tensor:
        scales = (self.k_scale[i], self.v_scale[i]) if self.k_scale else ()
        if self.lens is not None:
            return self.kernels.self_attend_rows(qkv, self.k[i], self.v[i], self.anc, self.lens, scale, *scales)
        return self.kernels.self_attend(qkv, self.k[i], self.v[i], self.anc, self.t + 1, scale, *scales)

    def cross_attention(self, i: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        keys, values, *scales = self.cross[i]
        return self.kernels.cross_attend(q, keys, values, self.positions, self.group, scale, *scales)

    def expand(self, k: int) -> None:
        if self.anc is None:  # before the first step (slot refill): the caches are made for k rows per image
            self.group *= k
            return
        # room for every beam's row; the positions filled so far stay in their rows, which the k
        # beams of a row all read through `anc` (nothing is copied per beam)
        n, filled = len(self.anc), self.t + 1
        self.group *= k
        self.k, self.v, self.k_scale, self.v_scale = ([self._grown(c, max(n * k, len(c)), filled) for c in caches]
                                                      for caches in (self.k, self.v, self.k_scale, self.v_scale))
        self.anc = self.anc.repeat_interleave(k, dim=0)
        self.own = torch.arange(n * k)

    @staticmethod
    def _grown(cache: torch.Tensor, rows: int, filled: int) -> torch.Tensor:
        """`cache` [rows', heads, positions, ...] with room for `rows`, its first `filled` positions kept."""
        grown = cache.new_empty((rows, *cache.shape[1:]))
        grown[: len(cache), :, :filled] = cache[:, :, :filled]
        return grown

    def reorder(self, rows: torch.Tensor) -> None:
        self.anc = self.anc.index_select(0, rows)


class RacedAttention:
    """An `AttentionBackend`: the kernels where the pass is lossy (caches in `dtype`, or autocast),
    they build for these shapes, and they timed faster than torch's ops here; else torch's ops.
    Caches in `dtype`, else in the dtype of the image's keys."""

    def __init__(self, dtype: Optional[torch.dtype] = None, image_dtype: Optional[torch.dtype] = None):
        """`image_dtype`: the kernels' image keys and values (`KernelAttention`), default the caches'."""
        self.dtype, self.image_dtype = dtype, image_dtype

    def __call__(self, image_kv: ImageKV, heads: int, max_len: int, autocast: bool) -> AttentionState:
        k = image_kv[0][0]
        head_dim, cache_dtype = k.shape[-1] // heads, self.dtype or k.dtype
        lossy = self.dtype is not None or autocast
        if lossy and k.device.type == "cpu" and kernels_faster(heads, head_dim, cache_dtype, k.dtype):
            return KernelAttention(heads, image_kv, cache_dtype, max_len, image_dtype=self.image_dtype)
        return TorchAttention(heads, image_kv, _torch_caches(self.dtype))

    def __repr__(self) -> str:
        return f"RacedAttention({self.dtype}, image_dtype={self.image_dtype})"


def refill_attention(head_dim: int, dtype: torch.dtype, image_dtype: Optional[torch.dtype] = None
                     ) -> Optional[AttentionBackend]:
    """The attention backend of slot refill (`mmcap.generation.refill`), whose rows sit at different
    positions: the kernels, caches in `dtype` (the image's keys and values in `image_dtype`, default
    `dtype`); None where they do not build here or for this head size."""
    if head_dim not in compiled.HEAD_DIMS or compiled.kernels() is None:
        return None
    return lambda image_kv, heads, max_len, autocast=False: KernelAttention(heads, image_kv, dtype, max_len,
                                                                            image_dtype=image_dtype)


def image_int8(keys: torch.Tensor, values: torch.Tensor, vnni: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 image keys [B, heads, head_dim, MP] and values [B, heads, MP, head_dim] as packed by
    `pack_image_kv`, as the integers they hold (int32) in that logical order. `vnni`: the kernels
    packed them in VNNI order (`vnni_image_kv()`): keys [head_dim / 4, MP, 4] as unsigned k + 128,
    values [MP / 4, head_dim, 4]."""
    if not vnni:
        return keys.int(), values.int()
    b, h, d, mp = keys.shape
    k = keys.view(b, h, d // 4, mp, 4).transpose(-1, -2).reshape(b, h, d, mp).view(torch.uint8).int() - 128
    v = values.view(b, h, mp // 4, d, 4).transpose(-1, -2).reshape(b, h, mp, d).int()
    return k, v


@functools.lru_cache(maxsize=None)
def kernels_faster(heads: int, head_dim: int, dtype: torch.dtype, input_dtype: torch.dtype = torch.float32) -> bool:
    """Whether the kernels run one layer's attention over a short beam search faster than torch's
    ops, with caches in `dtype` and inputs in `input_dtype` (timed once per machine and shape)."""
    if (head_dim not in compiled.HEAD_DIMS or (dtype, input_dtype) not in compiled.DTYPES
            or compiled.kernels() is None):
        return False
    what = (f"attention {heads} x {head_dim}, {_name(dtype)} caches, {_name(input_dtype)} in, "
            f"{TIMING['images']} images x {TIMING['beams']} beams")
    try:
        use = timing.fastest(what, ("kernels", "torch"), functools.partial(_timings, heads, head_dim, dtype, input_dtype))
    except RuntimeError as e:  # a kernel that refuses these shapes: torch's ops do the work
        log.warning("mmcap attention: the C++ kernels failed on %d heads of %d (%s); using torch's ops", heads,
                    head_dim, str(e).splitlines()[0])
        return False
    return use == "kernels"


def _torch_caches(dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
    """The caches of torch's ops for kernels' caches in `dtype`: int8 only the kernels keep (torch's
    ops then keep the linear layers' dtype)."""
    return None if dtype == torch.int8 else dtype


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _timings(heads: int, head_dim: int, dtype: torch.dtype, input_dtype: torch.dtype) -> dict[str, float]:
    """Seconds of one layer's attention over a short beam search, with the kernels and with torch's ops."""
    b, k, steps, m = TIMING["images"], TIMING["beams"], TIMING["positions"], TIMING["image_positions"]
    w = heads * head_dim
    gen = torch.Generator().manual_seed(0)
    image_kv = [(torch.randn(b, m, w, generator=gen).to(input_dtype), torch.randn(b, m, w, generator=gen).to(input_dtype))]
    qkvs = [torch.randn(b if t == 0 else b * k, 3 * w, generator=gen).to(input_dtype) for t in range(steps)]
    perm = torch.randperm(b * k, generator=gen)

    def decode(make) -> None:
        att = make()
        for t, qkv in enumerate(qkvs):
            att.begin(t, len(qkv))
            att.self_attention(0, qkv, 0.125)
            att.cross_attention(0, qkv[:, :w], 0.125)
            att.expand(k) if t == 0 else att.reorder(perm)

    return timing.time_calls({
        "kernels": functools.partial(decode, lambda: KernelAttention(heads, image_kv, dtype, steps)),
        "torch": functools.partial(decode, lambda: TorchAttention(heads, image_kv, _torch_caches(dtype))),
    })
