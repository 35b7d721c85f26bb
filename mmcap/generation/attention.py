"""The attention state of GPT-2's lean decoding pass (`mmcap.generation.gpt2_pass`), and how a
step attends: self-attention over the tokens so far, cross-attention over the image.

`AttentionState` is the interface; `TorchAttention` implements it in torch's ops, a
self-attention cache grown by one `cat` per layer and step (beam reorders gathered just before
it) and plain matmul attention; in fp32 it gives exactly the transformers forward's numbers. An
`AttentionBackend` makes the state for one pass: `torch_attention` here, or the one the inference
plan hands over (`mmcap.accel.kernel_attention`, C++ kernels where they timed faster).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Optional, Protocol

import torch

from mmcap.generation.beams import RowTop

ImageKV = Sequence[tuple[torch.Tensor, torch.Tensor]]  # per layer: the image's keys and values [B, M, width]


class LayerImageKV(Sequence):
    """An `ImageKV` whose layers are made when read (`make(i)`), the last one kept: a state that
    packs the keys and values layer by layer (mmcap's kernels) reads each while it is still in
    cache. For GPT-2 small at 16 images a layer's fp32 keys and values are 4.8 MB; made all at once
    and packed after, the 12 layers' 58 MB went out to memory and back (projection and packing 27-29
    ms a batch, against 17-19 one layer at a time)."""

    def __init__(self, make: Callable[[int], tuple[torch.Tensor, torch.Tensor]], layers: int):
        self._make, self._layers = make, layers
        self._last: Optional[tuple[int, tuple[torch.Tensor, torch.Tensor]]] = None

    def __len__(self) -> int:
        return self._layers

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self._layers <= i < self._layers:
            raise IndexError(f"layer {i} of {self._layers}")
        i %= self._layers
        if self._last is None or self._last[0] != i:
            self._last = (i, self._make(i))
        return self._last[1]


def image_rows(images: torch.Tensor, group: int) -> torch.Tensor:
    """The rows of `images` (positions among a pass's images) where each image has `group`
    consecutive rows (its beams): what a pass's `keep(images)` keeps."""
    return (images[:, None] * group + torch.arange(group, device=images.device)).view(-1)


class AttentionState:
    """What GPT-2's lean pass attends through, one step at a time: `begin(t, n)`, then per layer
    `self_attention` and `cross_attention`; beam search calls `expand`, `reorder` and `keep`.
    Every implementation keeps heads, beams per image, the position being written and the image's
    keys and values per layer (`cross`: per layer a tuple of tensors with the image first, the keys
    and values and whatever else the state keeps per image)."""

    # logits [N, V], k -> the k best log-probs [N, k] of each row and their tokens, without writing
    # the log-probs out: where a state's kernels offer it (mmcap's, in the lossy modes: their
    # log-sum-exp rounds otherwise than torch's log_softmax)
    log_softmax_top: Optional[RowTop] = None

    def __init__(self, heads: int, dtype: Optional[torch.dtype]):
        self.heads, self.dtype, self.group, self.t = heads, dtype, 1, 0
        self.cross: list[tuple[torch.Tensor, ...]] = []

    def begin(self, t: int, n: int) -> None:
        """A step at position `t` over `n` rows starts."""
        raise NotImplementedError

    def self_attention(self, i: int, qkv: torch.Tensor, scale: float) -> torch.Tensor:
        """Layer `i`'s attention of this step's queries [n, width] over the positions so far,
        given q, k, v side by side in `qkv` [n, 3 width]; the new key and value join the cache."""
        raise NotImplementedError

    def cross_attention(self, i: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        """Layer `i`'s attention of queries `q` [n, width] over their images' positions."""
        raise NotImplementedError

    def expand(self, k: int) -> None:
        raise NotImplementedError

    def reorder(self, rows: torch.Tensor) -> None:
        raise NotImplementedError

    def keep(self, images: torch.Tensor) -> None:
        """From now on only `images` (positions among the images so far), with their beams' rows."""
        self.reorder(image_rows(images, self.group))
        self.cross = [tuple(t.index_select(0, images) for t in per_image) for per_image in self.cross]


class TorchAttention(AttentionState):
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
        self.t, self.step_rows, self.rows = t, self.rows, None

    def self_attention(self, i: int, qkv: torch.Tensor, scale: float) -> torch.Tensor:
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


class AttentionBackend(Protocol):
    def __call__(self, image_kv: ImageKV, heads: int, max_len: int, autocast: bool) -> AttentionState:
        """The state for one pass over images with keys and values `image_kv`, at most `max_len`
        positions; `autocast`: the pass computes under autocast (its numbers are not fp32's anyway)."""


def torch_attention(image_kv: ImageKV, heads: int, max_len: int, autocast: bool = False) -> TorchAttention:
    """The default backend: torch's ops, caches in the dtype the linear layers give."""
    return TorchAttention(heads, image_kv)


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
        # cast, in one kernel instead of two
        return torch.matmul(torch.softmax(weights, -1), values)
    # else in fp32, as autocast runs it
    return torch.matmul(torch.softmax(weights, -1, dtype=torch.float32).to(values.dtype), values)
