"""A static self-attention cache for GPT-2's lean pass: every layer's keys and values live in one
buffer of the pass's full length, allocated once, written in place, and read whole under a mask.

Why: a step whose tensors keep their shapes and addresses from one step to the next is what a
CUDA graph can capture and replay (one launch instead of a few hundred per token). The dynamic
cache (`TorchAttention`) grows by a `cat` each step instead: new shapes, new buffers. Where the
position being written is a device tensor (`pos`) and the mask is updated in place, a step reads
no Python number that changes; beam reorders gather into the same buffer. Only `expand` (once,
after the first step) and `keep` (beam search dropping finished images; off for a captured step)
make new buffers. Captions equal the dynamic cache's; scores agree to float rounding, since
softmax and matmul then run over the full length with masked positions at exactly zero weight.
"""
from __future__ import annotations

from typing import Optional

import torch

from mmcap.generation.attention import ImageKV, TorchAttention


class StaticAttention(TorchAttention):
    """`TorchAttention`'s math over preallocated [2, rows, heads, max_len, head_dim] caches."""

    def __init__(self, heads: int, image_kv: ImageKV, max_len: int, dtype: Optional[torch.dtype] = None):
        super().__init__(heads, image_kv, dtype)
        self.max_len = max_len
        self.pos: Optional[torch.Tensor] = None  # [1] long: the position this step writes
        self.bias: Optional[torch.Tensor] = None  # [max_len]: 0 up to `pos`, -inf after

    def begin(self, t: int, n: int) -> None:
        super().begin(t, n)
        if self.pos is not None:
            self.pos.fill_(t)
            self.bias.index_fill_(0, self.pos, 0.0)

    def _buffers(self, i: int, new: torch.Tensor) -> torch.Tensor:
        """Layer `i`'s cache, made on first use (with the mask and position) and reordered in place."""
        cache = self.kv[i]
        if cache is None:
            _, n, h, _, d = new.shape
            cache = self.kv[i] = new.new_zeros(2, n, h, self.max_len, d)
            if self.pos is None:
                self.pos = torch.full((1,), self.t, dtype=torch.long, device=new.device)
                self.bias = torch.full((self.max_len,), float("-inf"), dtype=new.dtype, device=new.device)
                self.bias.index_fill_(0, self.pos, 0.0)
        elif self.step_rows is not None:
            if self.step_rows.shape[0] == cache.shape[1]:
                cache.copy_(cache.index_select(1, self.step_rows))  # same rows: same buffer
            else:  # `keep` dropped images: a smaller buffer
                cache = self.kv[i] = cache.index_select(1, self.step_rows)
        return cache

    def self_attention(self, i: int, qkv: torch.Tensor, scale: float) -> torch.Tensor:
        n, h = qkv.shape[0], self.heads
        w = qkv.shape[1] // 3
        new = qkv[:, w:].view(n, 2, h, 1, -1).transpose(0, 1).to(self.dtype or qkv.dtype)
        cache = self._buffers(i, new)
        cache.index_copy_(3, self.pos, new)
        q = qkv[:, :w].view(n, h, 1, -1)
        if q.dtype != cache.dtype:
            q = q.to(cache.dtype)
        weights = torch.matmul(q, cache[0].transpose(-1, -2)) * scale + self.bias  # bias: the cache's dtype
        return torch.matmul(torch.softmax(weights, -1), cache[1]).reshape(n, w)


def static_attention(image_kv: ImageKV, heads: int, max_len: int, autocast: bool = False) -> StaticAttention:
    """An `AttentionBackend`: GPT-2's lean pass with static caches (`generate(..., attention=static_attention)`)."""
    return StaticAttention(heads, image_kv, max_len)
