"""GPT-2's lean decoding pass: the same modules and weights as its transformers forward, fewer
kernels per token, and attention kept by an attention state (`mmcap.generation.attention`): the
image's keys and values once per image (the beams of an image attend to them together, never
copied). A linear layer that offers `fused(h, norm, gelu, residual)` (the inference plan's twins
may) does the LayerNorm before it, and the GELU and residual add after it, in the same call. In
fp32 with torch's attention it computes exactly the transformers forward's numbers."""
from __future__ import annotations

import functools
import math
from typing import Optional, Union

import torch
from transformers import GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from mmcap.generation.attention import AttentionBackend, LayerImageKV, torch_attention
from mmcap.generation.beams import HeadRows


class GPT2Decoding:
    """A `DecodingPass` for a Hugging Face GPT-2 with cross-attention (eval mode, cached): the math
    of its forward on its own modules, with less copying and fewer kernels per token. Attention,
    and what it keeps, is the `attention` backend's (torch's ops unless the inference plan hands
    over another)."""

    attentions = False  # attention maps come from the transformers forward (`HFDecoding`)

    def __init__(self, model: GPT2LMHeadModel, memory: torch.Tensor, max_len: int,
                 attention: AttentionBackend = torch_attention):
        cfg = model.config
        self.model, self.body = model, model.transformer
        self.memory, self.max_len = memory, max_len
        self.t = 0  # tokens fed so far
        # GPT-2's tanh GELU as one kernel (not transformers' eight) in the fast modes (autocast, or
        # int8 twins in place of its Conv1D layers); fp32 keeps transformers' exact arithmetic.
        autocast = torch.is_autocast_enabled(memory.device.type)
        fast = autocast or not isinstance(self.body.h[0].mlp.c_fc, Conv1D)
        self.fused_gelu = fast and cfg.activation_function == "gelu_new"
        # each layer's modules, looked up once: nn.Module's attribute lookup costs about a
        # microsecond, and a step makes 14 per layer
        self._blocks = [(b.ln_1, b.attn.c_attn, b.attn.c_proj, b.attn.scaling, b.ln_cross_attn, b.crossattention.q_attn,
                         b.crossattention.c_proj, b.crossattention.scaling, b.ln_2, b.mlp) for b in self.body.h]
        # the image's keys and values, once per image; the backend keeps them and the caches
        self.attention = attention(self._image_kv(memory), cfg.num_attention_heads, max_len, autocast)
        # beam search's top k of the log-probs, where offered; where the LM head can fold it into
        # its own kernel (`fused_top`), calls with `top=True` return `HeadRows`, not logits
        self._logits_top = self.attention.log_softmax_top
        self.row_top = self._row_top if self._logits_top is not None else None
        self.fused_top = self.row_top is not None and getattr(model.lm_head, "head_top", None) is not None

    @staticmethod
    def supports(model, attentions: bool) -> bool:
        cfg = model.config
        return (isinstance(model, GPT2LMHeadModel) and cfg.add_cross_attention and not model.training
                and not attentions)

    def __call__(self, seqs: torch.Tensor, top: bool = False) -> tuple[Union[torch.Tensor, HeadRows], None]:
        """Logits [N, V] of the token after `seqs`; with `top` where `fused_top`, `HeadRows` for `row_top`."""
        if seqs.shape[1] > self.max_len:
            raise ValueError(f"cannot decode past the {self.max_len} positions this pass was made for")
        while self.t < seqs.shape[1]:  # the first call feeds BOS and the prompt, one position at a time
            x = self._step(seqs[:, self.t])
        return self._head(x, top), None

    def _head(self, x: torch.Tensor, top: bool) -> Union[torch.Tensor, HeadRows]:
        if top and self.fused_top:
            return HeadRows(x, self.model.lm_head.out_features, self._head_top)
        return linear(self.model.lm_head, x, norm=self.body.ln_f).float()

    def _head_top(self, x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.lm_head.head_top(x, n, norm=self.body.ln_f)

    def _row_top(self, logits: Union[torch.Tensor, HeadRows], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return logits.top(n) if isinstance(logits, HeadRows) else self._logits_top(logits, n)

    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        """The last hidden state [N, width] of `tokens` [N] at position `self.t`, cached."""
        x = self.body.wte(tokens) + self.body.wpe.weight[self.t]
        self.attention.begin(self.t, tokens.shape[0])
        x = self._layers(x)
        self.t += 1
        return x

    def step_rows(self, tokens: torch.Tensor, positions: torch.Tensor, top: bool = False) -> Union[torch.Tensor, HeadRows]:
        """Logits [N, V] (fp32) of the token after `tokens` [N], row r's at position `positions[r]`
        (slot refill: rows of different images at different positions). Needs an attention state
        with `begin_rows` (mmcap's kernels). `top`: as in `__call__`."""
        x = self.body.wte(tokens) + self.body.wpe(positions)
        self.attention.begin_rows(positions)
        return self._head(self._layers(x), top)

    def admit(self, slots: torch.Tensor, memory: torch.Tensor) -> None:
        """Image tokens `memory` [n, M, D] decode in image slots `slots` [n] from now on (slot refill)."""
        self.attention.admit(slots, self._image_kv(memory))

    def _image_kv(self, memory: torch.Tensor) -> LayerImageKV:
        """Each layer's cross-attention keys and values of image tokens `memory` [n, M, D], made
        as the attention state reads them."""
        width, blocks = self.model.config.hidden_size, self.body.h
        return LayerImageKV(lambda i: blocks[i].crossattention.c_attn(memory).split(width, dim=2), len(blocks))

    def _layers(self, x: torch.Tensor) -> torch.Tensor:
        att = self.attention
        for i, (ln_1, c_attn, c_proj, scaling, ln_cross, q_attn, cross_proj, cross_scaling, ln_2, mlp) in enumerate(
                self._blocks):
            qkv = linear(c_attn, x, norm=ln_1)
            x = linear(c_proj, att.self_attention(i, qkv, scaling), residual=x)
            q = linear(q_attn, x, norm=ln_cross)
            x = linear(cross_proj, att.cross_attention(i, q, cross_scaling), residual=x)
            if self.fused_gelu:
                x = linear(mlp.c_proj, linear(mlp.c_fc, x, norm=ln_2, gelu=True), residual=x)
            else:
                x = x + mlp(ln_2(x))
        return x

    def expand(self, k: int) -> None:
        self.attention.expand(k)

    def reorder(self, rows: torch.Tensor) -> None:
        self.attention.reorder(rows)

    def keep(self, images: torch.Tensor) -> None:
        """From now on decode only `images` (positions among the images decoded so far, in order),
        with their beams' rows: beam search drops the images it has finished with."""
        self.attention.keep(images)


def linear(layer, h: torch.Tensor, norm=None, gelu: bool = False, residual: Optional[torch.Tensor] = None):
    """residual + gelu(layer(norm(h))), each part where given: in one call where the layer does the
    parts itself (a linear layer of an inference plan that offers `fused`), else one after another
    as transformers computes them."""
    fused = getattr(layer, "fused", None)
    if fused is not None:
        return fused(h, norm=norm, gelu=gelu, residual=residual)
    y = layer(norm(h) if norm is not None else h)
    if gelu:
        y = gelu_tanh(y)
    return y if residual is None else residual + y


_GELU_C1 = 2 * math.sqrt(2 / math.pi)  # 0.5 (1 + tanh(u)) = sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)
_GELU_C3 = _GELU_C1 * 0.044715


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh GELU, x sigmoid(2u), as F.gelu(approximate="tanh") computes it to fp32 rounding
    (max difference 5e-7 at 48 x 3072) in about half the time: torch's CPU tanh is slow and its
    sigmoid fast."""
    u2 = torch.addcmul(_constant(_GELU_C1, x), x, x, value=_GELU_C3)  # C1 + C3 x^2, one pass
    return u2.mul_(x).sigmoid_().mul_(x)


@functools.lru_cache(maxsize=None)
def _constant_on(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype, device=device)


def _constant(value: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor of `value` in `like`'s dtype and device, made once (not per call)."""
    return _constant_on(value, like.dtype, like.device)
