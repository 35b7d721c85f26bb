"""One decoding pass over a Hugging Face decoder, step by step: it feeds new tokens, keeps (or
recomputes) the past, and repeats or reorders rows as beam search asks. `mmcap.generation` runs
the search over it; LMs that read the image through `mmcap.fusion` bring their own pass
(`LMDecoding`) with the same four calls (`__call__`, `expand`, `reorder`, `attentions`); a pass
that can also drop finished images (`keep`) lets beam search stop decoding them.

GPT-2 decoders take a leaner pass (`GPT2Decoding`): the same modules and weights, fewer kernels
per token, and attention kept by `mmcap.gpt2_attention`: cross-attention keys/values once per
image (the beams of an image attend to them together, never copied), and either torch's plain
matmul attention over a cache grown by one `cat` per step (fp32: exactly the transformers
forward) or, in the lossy modes where they timed faster, mmcap's C++ kernels over row-indexed
caches. Other decoders, uncached decoding and attention maps use the transformers forward
(`HFDecoding`).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from transformers import GPT2LMHeadModel
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.pytorch_utils import Conv1D

from .gpt2_attention import attend, attention_for, image_rows  # noqa: F401 (importable here as before)


class HFDecoding:
    """One decoding pass: feeds new tokens, keeps (or, uncached, recomputes) the past."""

    def __init__(self, model, memory: torch.Tensor, use_cache: bool, attentions: bool):
        self.model, self.memory, self.use_cache, self.attentions = model, memory, use_cache, attentions
        self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache()) if use_cache else None
        self.seen = 0  # tokens in the cache
        self.group = 1  # consecutive rows (beams) per image

    def __call__(self, seqs: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Logits [N, V] (fp32) for the next token after `seqs` [N, t], and cross-attention [N, M]."""
        ids = seqs[:, self.seen:] if self.use_cache else seqs  # the first call feeds BOS and the prompt
        self.seen = seqs.shape[1] if self.use_cache else 0
        out = self.model(
            input_ids=ids,
            encoder_hidden_states=self.memory,
            cache=self.cache,
            use_cache=self.use_cache,
            output_attentions=self.attentions,
            return_dict=True,
        )
        att = None
        if self.attentions:
            # mean over layers and heads of the last query's attention to the image tokens
            att = torch.stack([a[:, :, -1, :] for a in out.cross_attentions]).float().mean(dim=(0, 2))
        return out.logits[:, -1, :].float(), att

    def expand(self, k: int) -> None:
        """Repeat every row k times (after the first step on the un-expanded batch)."""
        self.memory = self.memory.repeat_interleave(k, dim=0)
        self.group *= k
        if self.cache is not None:
            self.cache.batch_repeat_interleave(k)

    def reorder(self, rows: torch.Tensor) -> None:
        if self.cache is not None:
            self.cache.self_attention_cache.reorder_cache(rows)

    def keep(self, images: torch.Tensor) -> None:
        """Decode only `images` (positions among the images decoded so far) from now on."""
        rows = image_rows(images, self.group)
        self.memory = self.memory.index_select(0, rows)
        if self.cache is not None:  # the cross-attention cache too: it holds a copy per row
            self.cache.reorder_cache(rows)


class GPT2Decoding:
    """Cached decoding for a Hugging Face GPT-2 with cross-attention (eval mode): the math of its
    forward on its own modules, with less copying and fewer kernels per token."""

    attentions = False  # attention maps come from the transformers forward (`HFDecoding`)

    def __init__(self, model: GPT2LMHeadModel, memory: torch.Tensor, max_len: int,
                 attention_dtype: Optional[torch.dtype] = None):
        cfg = model.config
        self.model, self.body = model, model.transformer
        self.memory, self.max_len = memory, max_len
        self.t = 0  # tokens fed so far
        # GPT-2's tanh GELU as one kernel (not transformers' eight) in the fast modes (autocast, or
        # int8 twins in place of its Conv1D layers); fp32 keeps transformers' exact arithmetic.
        autocast = torch.is_autocast_enabled(memory.device.type)
        fast = autocast or not isinstance(self.body.h[0].mlp.c_fc, Conv1D)
        self.fused_gelu = fast and cfg.activation_function == "gelu_new"
        # attention caches in `attention_dtype` (int8 mode: bf16 where bf16 measured fast; a step
        # moves half the bytes), else in the dtype the linear layers give. The image's keys and
        # values are computed once per image.
        image_kv = [block.crossattention.c_attn(memory).split(cfg.hidden_size, dim=2) for block in self.body.h]
        self.attention = attention_for(image_kv, cfg.num_attention_heads, max_len, attention_dtype,
                                       lossy=attention_dtype is not None or autocast)

    @staticmethod
    def supports(model, attentions: bool) -> bool:
        cfg = model.config
        return (isinstance(model, GPT2LMHeadModel) and cfg.add_cross_attention and not model.training
                and not attentions)

    def __call__(self, seqs: torch.Tensor) -> tuple[torch.Tensor, None]:
        if seqs.shape[1] > self.max_len:
            raise ValueError(f"cannot decode past the {self.max_len} positions this pass was made for")
        while self.t < seqs.shape[1]:  # the first call feeds BOS and the prompt, one position at a time
            x = self._step(seqs[:, self.t])
        return self.model.lm_head(self.body.ln_f(x)).float(), None

    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        """The last hidden state [N, width] of `tokens` [N] at position `self.t`, cached."""
        body, att = self.body, self.attention
        x = body.wte(tokens) + body.wpe.weight[self.t]
        att.begin(self.t, tokens.shape[0])
        for i, block in enumerate(body.h):
            attn, cross, mlp = block.attn, block.crossattention, block.mlp
            x = x + attn.c_proj(att.self_attention(i, attn.c_attn(block.ln_1(x)), attn.scaling))
            x = x + cross.c_proj(att.cross_attention(i, cross.q_attn(block.ln_cross_attn(x)), cross.scaling))
            x = x + (mlp.c_proj(gelu_tanh(mlp.c_fc(block.ln_2(x)))) if self.fused_gelu else mlp(block.ln_2(x)))
        self.t += 1
        return x

    def expand(self, k: int) -> None:
        self.attention.expand(k)

    def reorder(self, rows: torch.Tensor) -> None:
        self.attention.reorder(rows)

    def keep(self, images: torch.Tensor) -> None:
        """From now on decode only `images` (positions among the images decoded so far, in order),
        with their beams' rows: beam search drops the images it has finished with."""
        self.attention.keep(images)


_GELU_C1 = 2 * math.sqrt(2 / math.pi)  # 0.5 (1 + tanh(u)) = sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)
_GELU_C3 = _GELU_C1 * 0.044715


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh GELU, x sigmoid(2u), as F.gelu(approximate="tanh") computes it to fp32 rounding
    (max difference 5e-7 at 48 x 3072) in 39 us instead of 87 here: torch's CPU tanh is slow and
    its sigmoid fast."""
    u2 = torch.addcmul(_constant(_GELU_C1, x), x, x, value=_GELU_C3)  # C1 + C3 x^2, one pass
    return u2.mul_(x).sigmoid_().mul_(x)


@functools.lru_cache(maxsize=None)
def _constant_on(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype, device=device)


def _constant(value: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor of `value` in `like`'s dtype and device, made once (not per call)."""
    return _constant_on(value, like.dtype, like.device)
