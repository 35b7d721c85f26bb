"""The attention state of GPT-2's lean decoding pass (`mmcap.decoding.GPT2Decoding`), and how a
step attends: self-attention over the tokens so far, cross-attention over the image.

Two implementations of one interface; `attention_for` picks one:
- `TorchAttention`, torch's ops: a self-attention cache grown by one `cat` per layer and step
  (beam reorders gathered just before it) and plain matmul attention. fp32 gives exactly the
  transformers forward's numbers; the other modes keep the caches in `dtype`.
- `KernelAttention`, mmcap's C++ kernels (`mmcap.attention_kernel`): preallocated caches read
  through a row table, so that a beam reorder copies no keys, and one call per layer for each
  attention. It computes in fp32 whatever the caches hold (other rounding than torch's chain), so
  only the lossy modes use it (int8, and bf16 autocast), where it measured faster.

Both keep the image's keys and values once per image: the beams of an image attend to them
together, never copied.
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Optional

import torch

from . import attention_kernel

log = logging.getLogger(__name__)

ImageKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: the image's keys and values [B, M, width]


def image_rows(images: torch.Tensor, group: int) -> torch.Tensor:
    """The rows of `images` (positions among a pass's images) where each image has `group`
    consecutive rows (its beams): what a pass's `keep(images)` keeps."""
    return (images[:, None] * group + torch.arange(group, device=images.device)).view(-1)


class _Attention:
    """What both implementations keep: heads, beams per image, the position being written and the
    image's keys and values per layer (`cross`, pairs with the image first)."""

    def __init__(self, heads: int, dtype: Optional[torch.dtype]):
        self.heads, self.dtype, self.group, self.t = heads, dtype, 1, 0
        self.cross: list[tuple[torch.Tensor, torch.Tensor]] = []

    def reorder(self, rows: torch.Tensor) -> None:
        raise NotImplementedError

    def keep(self, images: torch.Tensor) -> None:
        """From now on only `images` (positions among the images so far), with their beams' rows."""
        self.reorder(image_rows(images, self.group))
        self.cross = [(keys.index_select(0, images), values.index_select(0, images)) for keys, values in self.cross]


class TorchAttention(_Attention):
    """Attention in torch's ops, caches in `dtype` (None: the dtype the linear layers give)."""

    def __init__(self, heads: int, image_kv: ImageKV, dtype: Optional[torch.dtype] = None):
        super().__init__(heads, dtype)
        # self-attention keys and values per layer, [2, rows, heads, positions, head_dim], made
        # anew each step (the past and the new position, one `cat`): contiguous, as oneDNN's bf16
        # matmul needs (it copies any other layout itself), keys read transposed
        self.kv: list[Optional[torch.Tensor]] = [None] * len(image_kv)
        self.rows: Optional[torch.Tensor] = None  # a beam reorder not yet applied to `kv`
        self.step_rows: Optional[torch.Tensor] = None  # the reorder this step applies, layer by layer
        for k, v in image_kv:  # [B, heads, head_dim, M] keys (transposed), [B, heads, M, head_dim] values
            b, m, _ = k.shape
            if dtype is not None:
                k, v = k.to(dtype), v.to(dtype)
            keys = k.view(b, m, heads, -1).permute(0, 2, 3, 1).contiguous()
            self.cross.append((keys, v.view(b, m, heads, -1).transpose(1, 2).contiguous()))

    def begin(self, t: int, n: int) -> None:
        """A step at position `t` over `n` rows starts."""
        self.t, self.step_rows, self.rows = t, self.rows, None

    def self_attention(self, i: int, qkv: torch.Tensor, scale: float) -> torch.Tensor:
        """Layer `i`'s attention of this step's queries [n, width] over the positions so far,
        given q, k, v side by side in `qkv` [n, 3 width]; the new key and value join the cache."""
        n, h = qkv.shape[0], self.heads
        w = qkv.shape[1] // 3
        kv = qkv[:, w:].view(n, 2, h, 1, -1).transpose(0, 1).to(self.dtype or qkv.dtype,
                                                                 memory_format=torch.contiguous_format)
        if self.t > 0:  # append to the past, reordered for the beams as pending
            past = self.kv[i] if self.step_rows is None else self.kv[i].index_select(1, self.step_rows)
            kv = torch.cat([past, kv], dim=3)
        self.kv[i] = kv
        return attend(qkv[:, :w].view(n, h, 1, -1), kv[0].transpose(-1, -2), kv[1], scale).reshape(n, w)

    def cross_attention(self, i: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        """Layer `i`'s attention of queries `q` [n, width] over their images' positions."""
        n, w = q.shape
        # the beams of one image form one block of queries against that image's keys
        q = q.view(n // self.group, self.group, self.heads, -1).transpose(1, 2)
        return attend(q, *self.cross[i], scale).transpose(1, 2).reshape(n, w)

    def expand(self, k: int) -> None:
        self._apply_reorder()
        self.group *= k
        self.kv = [kv.repeat_interleave(k, dim=1) for kv in self.kv]

    def reorder(self, rows: torch.Tensor) -> None:
        # Applied lazily, layer by layer in the next step: each layer's cache is gathered (one
        # contiguous copy per row, `index_select` on the row dimension) just before its `cat`.
        # Copying only the rows whose beam changed, one call per row, cost more in calls than
        # it saved in bytes.
        self.rows = rows if self.rows is None else self.rows.index_select(0, rows)

    def _apply_reorder(self) -> None:
        if self.rows is not None:
            self.kv = [kv.index_select(1, self.rows) for kv in self.kv]
            self.rows = None


class KernelAttention(_Attention):
    """Attention in mmcap's C++ kernels, caches in `dtype` (fp32 or bf16), arithmetic in fp32.

    The self-attention cache of a layer is [rows, heads, max_len, head_dim], allocated at the first
    step and grown once when beam search expands rows into beams; row n's position p is read from
    cache row `anc[n, p]` (its ancestor's row at that position). A step writes each row's new key
    and value at its own row, so a beam reorder or a dropped image only re-indexes `anc`: nothing
    is copied.
    """

    def __init__(self, heads: int, image_kv: ImageKV, dtype: torch.dtype, max_len: int, kernels=None):
        super().__init__(heads, dtype)
        self.max_len = max_len
        self.kernels = kernels or attention_kernel.kernels()
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.anc: Optional[torch.Tensor] = None  # [rows, max_len] cache rows
        for k, v in image_kv:  # keys [B, heads, head_dim, MP] (transposed), values [B, heads, MP, head_dim]
            b, m, w = k.shape
            self.positions, padded = m, -(-m // 16) * 16  # whole vectors of positions, whatever their width
            keys = k.new_zeros((b, heads, w // heads, padded), dtype=dtype)
            keys[..., :m] = k.view(b, m, heads, -1).permute(0, 2, 3, 1)
            values = v.new_zeros((b, heads, padded, w // heads), dtype=dtype)
            values[:, :, :m] = v.view(b, m, heads, -1).transpose(1, 2)
            self.cross.append((keys, values))

    def begin(self, t: int, n: int) -> None:
        if self.anc is None:  # the first step: caches for its rows
            shape = (n, self.heads, self.max_len, self.cross[0][1].shape[-1])
            self.k = [torch.empty(shape, dtype=self.dtype) for _ in self.cross]
            self.v = [torch.empty(shape, dtype=self.dtype) for _ in self.cross]
            self.anc = torch.empty(n, self.max_len, dtype=torch.long)
            self.own = torch.arange(n)
        self.t = t
        self.anc[:, t] = self.own[:n]  # each row writes its new key and value at its own cache row

    def self_attention(self, i: int, qkv: torch.Tensor, scale: float) -> torch.Tensor:
        return self.kernels.self_attend(qkv, self.k[i], self.v[i], self.anc, self.t + 1, scale)

    def cross_attention(self, i: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        return self.kernels.cross_attend(q, *self.cross[i], self.positions, self.group, scale)

    def expand(self, k: int) -> None:
        # room for every beam's row; the positions filled so far stay in their rows, which the k
        # beams of a row all read through `anc` (nothing is copied per beam)
        n, filled = len(self.anc), self.t + 1
        self.group *= k
        self.k = [self._grown(c, max(n * k, len(c)), filled) for c in self.k]
        self.v = [self._grown(c, max(n * k, len(c)), filled) for c in self.v]
        self.anc = self.anc.repeat_interleave(k, dim=0)
        self.own = torch.arange(n * k)

    @staticmethod
    def _grown(cache: torch.Tensor, rows: int, filled: int) -> torch.Tensor:
        grown = cache.new_empty((rows, *cache.shape[1:]))
        grown[: len(cache), :, :filled] = cache[:, :, :filled]
        return grown

    def reorder(self, rows: torch.Tensor) -> None:
        self.anc = self.anc.index_select(0, rows)


def attention_for(image_kv: ImageKV, heads: int, max_len: int, dtype: Optional[torch.dtype], lossy: bool):
    """The faster attention this machine runs for these shapes: the kernels only where the caller
    accepts other rounding (`lossy`: int8, or bf16 autocast), they build, and they timed faster
    than torch's ops. Caches in `dtype`, else in the dtype of the image's keys."""
    k = image_kv[0][0]
    head_dim, cache_dtype = k.shape[-1] // heads, dtype or k.dtype
    built = (cache_dtype, k.dtype) in attention_kernel.DTYPES
    if lossy and built and k.device.type == "cpu" and _kernel_faster(heads, head_dim, cache_dtype, k.dtype):
        return KernelAttention(heads, image_kv, cache_dtype, max_len)
    return TorchAttention(heads, image_kv, dtype)


TIMING = dict(images=16, beams=3, positions=12, image_positions=49)  # `caption`'s default batch, beam 3
# (heads, head_dim, cache dtype, input dtype) -> what the race measured and chose, for logs and benchmarks
RACES: dict[tuple[int, int, str, str], dict] = {}


def choices() -> dict[str, str]:
    """The attention each shape raced to in this process, e.g. {"12x64 bfloat16 caches, float32 in": "kernels"}."""
    return {f"{h}x{d} {dt} caches, {it} in": race["use"] for (h, d, dt, it), race in RACES.items()}


@functools.lru_cache(maxsize=None)
def _kernel_faster(heads: int, head_dim: int, dtype: torch.dtype, input_dtype: torch.dtype = torch.float32) -> bool:
    """Times one layer's attention over a short beam search both ways (once per process and shape),
    with caches in `dtype` and queries, keys and values coming in `input_dtype`."""
    if head_dim not in attention_kernel.HEAD_DIMS or attention_kernel.kernels() is None:
        return False
    try:
        kernel, torch_ops = _timings(heads, head_dim, dtype, input_dtype)
    except RuntimeError as e:  # a kernel that refuses these shapes: torch's ops do the work
        log.warning("mmcap attention: the C++ kernels failed on %d heads of %d (%s); using torch's ops", heads,
                    head_dim, str(e).splitlines()[0])
        return False
    faster = kernel < torch_ops
    RACES[heads, head_dim, _name(dtype), _name(input_dtype)] = {
        "kernels_ms": round(kernel * 1e3, 3), "torch_ms": round(torch_ops * 1e3, 3),
        "use": "kernels" if faster else "torch"}
    log.info("mmcap attention (%d heads of %d, %s caches, %s in): C++ kernels %.2f ms, torch %.2f ms per %d steps "
             "of one layer at %d rows: using %s", heads, head_dim, _name(dtype), _name(input_dtype), kernel * 1e3,
             torch_ops * 1e3, TIMING["positions"], TIMING["images"] * TIMING["beams"],
             "the kernels" if faster else "torch's ops")
    return faster


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _timings(heads: int, head_dim: int, dtype: torch.dtype, input_dtype: torch.dtype,
             repeats: int = 5) -> tuple[float, float]:
    """Best seconds of (kernels, torch's ops) for one layer's attention over a short beam search."""
    b, k, steps, m = TIMING["images"], TIMING["beams"], TIMING["positions"], TIMING["image_positions"]
    w = heads * head_dim
    gen = torch.Generator().manual_seed(0)
    image_kv = [(torch.randn(b, m, w, generator=gen).to(input_dtype), torch.randn(b, m, w, generator=gen).to(input_dtype))]
    qkvs = [torch.randn(b if t == 0 else b * k, 3 * w, generator=gen).to(input_dtype) for t in range(steps)]
    perm = torch.randperm(b * k, generator=gen)

    def decode(att) -> float:
        start = time.perf_counter()
        for t, qkv in enumerate(qkvs):
            att.begin(t, len(qkv))
            att.self_attention(0, qkv, 0.125)
            att.cross_attention(0, qkv[:, :w], 0.125)
            att.expand(k) if t == 0 else att.reorder(perm)
        return time.perf_counter() - start

    makers = (lambda: KernelAttention(heads, image_kv, dtype, steps), lambda: TorchAttention(heads, image_kv, dtype))
    best = [float("inf"), float("inf")]
    for r in range(repeats + 1):  # alternating, so that a burst of other load hits both; the first warms up
        for j, make in enumerate(makers):
            took = decode(make())
            if r:
                best[j] = min(best[j], took)
    return best[0], best[1]


def attend(q: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q keys * scale) values: q [..., queries, head_dim], keys_t [..., head_dim, keys]
    (transposed), values [..., keys, head_dim], the result in the keys' dtype. For a few queries
    plain matmuls beat the fused attention kernels on CPU, most of all in bf16."""
    if q.dtype != keys_t.dtype:  # (int8 mode) one pass casts q to the caches' dtype, scales it and makes it contiguous
        q = torch.mul(q, scale, out=torch.empty(q.shape, dtype=keys_t.dtype, device=q.device))
        weights = torch.matmul(q, keys_t)
    else:  # scaled after the matmul, as transformers does: fp32 stays identical to it
        weights = torch.matmul(q, keys_t) * scale
    if weights.dtype == torch.bfloat16 and weights.device.type == "cpu":
        # torch's CPU softmax computes bf16 in fp32 and rounds once: the same values as fp32 and a
        # cast, in one kernel (29 us against 47 for 48 beams x 12 heads here)
        return torch.matmul(torch.softmax(weights, -1), values)
    # else in fp32, as autocast runs it
    return torch.matmul(torch.softmax(weights, -1, dtype=torch.float32).to(values.dtype), values)
