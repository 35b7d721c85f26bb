"""The decoding pass of a causal LM that reads the image through a fusion (`mmcap.model.fusion`):
a prefix or inserted cross-attention. The image enters once per image (its state is repeated and
selected with the beams); the LM's own cache is transformers' `DynamicCache`."""
from __future__ import annotations

from typing import Optional

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache

from mmcap.generation.attention import image_rows


class LMDecoding:
    """A `DecodingPass` over a causal LM that reads the image through `fusion`: feeds the tokens the
    cache has not seen (uncached: everything, image included, every step)."""

    def __init__(self, lm: PreTrainedModel, fusion, memory: torch.Tensor, use_cache: bool, attentions: bool):
        self.lm, self.fusion, self.memory, self.attentions = lm, fusion, memory, attentions
        self.state = fusion.image_state(memory)
        self.cache = DynamicCache(config=lm.config) if use_cache else None
        self.seen = 0  # text tokens in the cache
        self.group = 1  # consecutive rows (beams) per image

    def __call__(self, seqs: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        new = seqs[:, self.seen:]
        logits, att = self.fusion.run(self.lm, self.state, new, cache=self.cache, with_image=self.seen == 0,
                                      attentions=self.attentions)
        if self.cache is not None:
            self.seen = seqs.shape[1]
        return logits[:, -1, :].float(), (att[:, -1] if att is not None else None)

    def expand(self, k: int) -> None:
        self.memory = self.memory.repeat_interleave(k, dim=0)
        self.state = self.fusion.repeat(self.state, k)
        self.group *= k
        if self.cache is not None:
            self.cache.batch_repeat_interleave(k)

    def reorder(self, rows: torch.Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder_cache(rows)

    def keep(self, images: torch.Tensor) -> None:
        """From now on decode only `images` (positions among the images decoded so far), with their
        beams' rows: beam search drops the images it has finished with."""
        rows = image_rows(images, self.group)
        self.memory = self.memory.index_select(0, rows)
        self.state = self.fusion.select(self.state, rows)
        self.reorder(rows)
