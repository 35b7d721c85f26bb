"""`generate`: caption decoding, greedy, sampling or beam search, over a cached decoder.

Argument names and meanings follow `transformers.GenerationConfig`, and greedy/beam results equal
`model.generate` on the same decoder and image tokens. What differs is the cost: the image tokens
enter once per image (the first step runs on the un-expanded batch, then the cache is repeated per
beam), reordering beams touches only the self-attention cache, because every beam of one image
shares the same cross-attention keys and values, and beam search stops decoding an image once
nothing can beat its finished hypotheses.

A prompt (token ids per image) follows BOS: decoding starts from `BOS prompt` as transformers'
`generate(input_ids=BOS + prompt)` does, and returns the continuation only. Images whose prompts
differ in length decode in separate groups, one per length, so that every row of a group has its
tokens at the same positions (no left padding: each cache and position scheme stays as it is).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch

from mmcap.generation.attention import AttentionBackend, torch_attention
from mmcap.generation.beam_search import beam_search
from mmcap.generation.config import GenerationConfig
from mmcap.generation.greedy import greedy_or_sample
from mmcap.generation.output import GenerationOutput, merged
from mmcap.generation.passes import decoding_pass


@torch.no_grad()
def generate(model, memory: torch.Tensor, bos: int, eos: int, pad: int, cfg: GenerationConfig,
             output_attentions: bool = False, fusion=None, prompts: Optional[Sequence[Sequence[int]]] = None,
             attention: AttentionBackend = torch_attention) -> GenerationOutput:
    """Decode captions for image tokens `memory` [B, M, D] with the Hugging Face decoder `model`,
    reading them through `fusion` (`mmcap.model.fusion`; None: the decoder's own cross-attention).

    `prompts`: per image, token ids that follow BOS; the captions continue them (and leave them out).
    `attention`: the attention backend of GPT-2's lean pass (the inference plan's, in `Captioner`).
    """
    if cfg.max_new_tokens is None:
        raise ValueError("generate() needs max_new_tokens: use cfg.resolved(max_caption_tokens)")
    b = memory.shape[0]
    prompts = [list(p) for p in prompts] if prompts is not None else [[] for _ in range(b)]
    if len(prompts) != b:
        raise ValueError(f"generate() got {b} images but {len(prompts)} prompts")
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    if len(groups) > 1:
        return merged([(rows, generate(model, memory[rows], bos, eos, pad, cfg, output_attentions, fusion,
                                       [prompts[i] for i in rows], attention))
                       for rows in groups.values()], b, pad)
    start = torch.full((b, 1 + next(iter(groups), 0)), bos, dtype=torch.long, device=memory.device)
    if start.shape[1] > 1:
        start[:, 1:] = torch.tensor(prompts, dtype=torch.long)
    dec = decoding_pass(model, memory, fusion=fusion, use_cache=cfg.use_cache, attentions=output_attentions,
                        max_len=start.shape[1] + cfg.max_new_tokens, attention=attention)
    with _eager_attention(model, output_attentions):
        if cfg.num_beams == 1:
            return greedy_or_sample(dec, start, eos, pad, cfg)
        return beam_search(dec, start, eos, pad, cfg)


@contextlib.contextmanager
def _eager_attention(model, needed: bool):
    """Attention weights need the eager kernels; switch only for the call that asks."""
    before = model.config._attn_implementation
    if needed and before != "eager":
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if needed and before != "eager":
            model.set_attn_implementation(before)
