"""The transformers forward as a decoding pass: any decoder with its own cross-attention
(`encoder_hidden_states`), cached through `EncoderDecoderCache` or recomputed every step."""
from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from mmcap.generation.attention import image_rows


class HFDecoding:
    """A `DecodingPass` over the transformers forward: feeds new tokens, keeps (or, uncached, recomputes) the past."""

    def __init__(self, model, memory: torch.Tensor, use_cache: bool, attentions: bool):
        self.model, self.memory, self.use_cache, self.attentions = model, memory, use_cache, attentions
        self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache()) if use_cache else None
        self.seen = 0  # tokens in the cache
        self.group = 1  # consecutive rows (beams) per image

    def __call__(self, seqs: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        ids = seqs[:, self.seen:] if self.use_cache else seqs  # the first call feeds BOS and the prompt
        self.seen = seqs.shape[1] if self.use_cache else 0
        out = self.model(input_ids=ids, encoder_hidden_states=self.memory, cache=self.cache,
                         use_cache=self.use_cache, output_attentions=self.attentions, return_dict=True)
        att = None
        if self.attentions:
            # mean over layers and heads of the last query's attention to the image tokens
            att = torch.stack([a[:, :, -1, :] for a in out.cross_attentions]).float().mean(dim=(0, 2))
        return out.logits[:, -1, :].float(), att

    def expand(self, k: int) -> None:
        self.memory = self.memory.repeat_interleave(k, dim=0)
        self.group *= k
        if self.cache is not None:
            self.cache.batch_repeat_interleave(k)

    def reorder(self, rows: torch.Tensor) -> None:
        if self.cache is not None:
            self.cache.self_attention_cache.reorder_cache(rows)

    def keep(self, images: torch.Tensor) -> None:
        rows = image_rows(images, self.group)
        self.memory = self.memory.index_select(0, rows)
        if self.cache is not None:  # the cross-attention cache too: it holds a copy per row
            self.cache.reorder_cache(rows)
