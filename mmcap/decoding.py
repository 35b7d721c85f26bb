"""One decoding pass over a Hugging Face decoder, step by step: it feeds new tokens, keeps (or
recomputes) the past, and repeats or reorders rows as beam search asks. `mmcap.generation` runs
the search over it; LMs that read the image through `mmcap.fusion` bring their own pass
(`LMDecoding`) with the same four calls (`__call__`, `expand`, `reorder`, `attentions`); a pass
that can also drop finished images (`keep`) lets beam search stop decoding them.

GPT-2 decoders take a leaner pass (`GPT2Decoding`): the same modules and weights, but a
self-attention cache grown by one `cat` per layer and step (beam reorders gathered just before
it), cross-attention keys/values kept once per image (the beams of an image attend to them
together, never copied) and plain matmul attention, which for one new token is much faster on
CPU than the fused kernels. Other decoders, uncached decoding and attention maps use the
transformers forward (`HFDecoding`).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from transformers import GPT2LMHeadModel
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.pytorch_utils import Conv1D


def image_rows(images: torch.Tensor, group: int) -> torch.Tensor:
    """The rows of `images` (positions among a pass's images) where each image has `group`
    consecutive rows (its beams): what a pass's `keep(images)` keeps."""
    return (images[:, None] * group + torch.arange(group, device=images.device)).view(-1)


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
        self.width, self.heads = cfg.hidden_size, cfg.num_attention_heads
        self.memory, self.max_len = memory, max_len
        self.t, self.group = 0, 1  # tokens fed so far; consecutive rows (beams) per image
        # GPT-2's tanh GELU as one kernel (not transformers' eight) in the fast modes (autocast, or
        # int8 twins in place of its Conv1D layers); fp32 keeps transformers' exact arithmetic.
        fast = torch.is_autocast_enabled(memory.device.type) or not isinstance(self.body.h[0].mlp.c_fc, Conv1D)
        self.fused_gelu = fast and cfg.activation_function == "gelu_new"
        # attention caches and matmuls in `attention_dtype` (int8 mode: bf16 where bf16 measured
        # fast; a step copies half the bytes), else in the dtype the linear layers give
        self.attention_dtype = attention_dtype
        # self-attention keys and values per layer, [2, rows, heads, positions, head_dim], made
        # anew each step (the past and the new position, one `cat`): contiguous, as oneDNN's bf16
        # matmul needs (it copies any other layout itself), keys read transposed
        self.kv: list[Optional[torch.Tensor]] = [None] * cfg.num_hidden_layers
        self.rows: Optional[torch.Tensor] = None  # a beam reorder not yet applied to `kv`
        # image keys/values once per image, [B, heads, M, head_dim]: never repeated per beam
        b, m, _ = memory.shape
        self.cross = []
        for block in self.body.h:
            k, v = block.crossattention.c_attn(memory).split(self.width, dim=2)
            if attention_dtype is not None:
                k, v = k.to(attention_dtype), v.to(attention_dtype)
            keys = k.view(b, m, self.heads, -1).permute(0, 2, 3, 1).contiguous()  # [B, heads, head_dim, M]
            self.cross.append((keys, v.view(b, m, self.heads, -1).transpose(1, 2).contiguous()))

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
        n, t, h, w = tokens.shape[0], self.t, self.heads, self.width
        body = self.body
        x = body.wte(tokens) + body.wpe.weight[t]
        rows, self.rows = self.rows, None
        for i, block in enumerate(body.h):
            attn, cross, mlp = block.attn, block.crossattention, block.mlp
            qkv = attn.c_attn(block.ln_1(x))
            dtype = self.attention_dtype or qkv.dtype
            kv = qkv[:, w:].view(n, 2, h, 1, -1).transpose(0, 1).to(dtype, memory_format=torch.contiguous_format)
            if t > 0:  # append to the past, reordered for the beams as pending
                past = self.kv[i] if rows is None else self.kv[i].index_select(1, rows)
                kv = torch.cat([past, kv], dim=3)
            self.kv[i] = kv
            y = attend(qkv[:, :w].view(n, h, 1, -1), kv[0].transpose(-1, -2), kv[1], attn.scaling)
            x = x + attn.c_proj(y.reshape(n, w))
            # the beams of one image form one block of queries against that image's keys
            q = cross.q_attn(block.ln_cross_attn(x)).view(n // self.group, self.group, h, -1).transpose(1, 2)
            y = attend(q, *self.cross[i], cross.scaling)
            x = x + cross.c_proj(y.transpose(1, 2).reshape(n, w))
            x = x + (mlp.c_proj(gelu_tanh(mlp.c_fc(block.ln_2(x)))) if self.fused_gelu else mlp(block.ln_2(x)))
        self.t += 1
        return x

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

    def keep(self, images: torch.Tensor) -> None:
        """From now on decode only `images` (positions among the images decoded so far, in order),
        with their beams' rows: beam search drops the images it has finished with."""
        self.reorder(image_rows(images, self.group))
        self.cross = [(keys.index_select(0, images), values.index_select(0, images)) for keys, values in self.cross]

    def _apply_reorder(self) -> None:
        if self.rows is not None:
            self.kv = [kv.index_select(1, self.rows) for kv in self.kv]
            self.rows = None


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
