"""How the image tokens reach the language model: `decoder.fusion`.

- `OwnCrossAttention`: GPT-2's and BERT's own cross-attention layers (`encoder_hidden_states`).
- `Prefix`: the image tokens, already at the LM's width, come before the text (LLaVA, ClipCap).
- `InsertedCrossAttention`: for any other causal LM, gated cross-attention blocks run before every
  k-th layer (Flamingo). Their tanh gates start at zero, so the LM starts exactly as it was.

Every fusion computes teacher-forced logits (`logits`) and, for decoding, what one image
contributes (`image_state`, computed once per image, repeated and selected with the beams); the
decoding pass over a fused LM is `mmcap.generation.lm_pass.LMDecoding`.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from mmcap.config import DecoderConfig
from mmcap.model.decoder import uses_own_cross_attention


class Fusion(nn.Module):
    """Common to every fusion: `image_state` is what one image contributes, computed once."""

    own_cross_attention = False  # True: the decoder reads `encoder_hidden_states` itself

    def image_state(self, memory: torch.Tensor) -> Any:
        return memory

    def repeat(self, state: Any, k: int) -> Any:
        return state.repeat_interleave(k, dim=0)

    def select(self, state: Any, rows: torch.Tensor) -> Any:
        """`state` (from `image_state`, maybe repeated) for the rows `rows` only."""
        return state.index_select(0, rows)

    def run(self, lm: PreTrainedModel, state: Any, input_ids: torch.Tensor, attention_mask=None,
            cache=None, with_image: bool = True, attentions: bool = False):
        """(logits [N, t, V] of the text positions `input_ids`, image attention [N, t, M] or None)."""
        raise NotImplementedError

    def logits(self, lm: PreTrainedModel, memory: torch.Tensor, input_ids: torch.Tensor,
               attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.run(lm, self.image_state(memory), input_ids, attention_mask)[0]


class OwnCrossAttention(Fusion):
    """GPT-2/BERT cross-attention layers; decoding takes the decoder's own passes (`mmcap.generation.passes`)."""

    own_cross_attention = True

    def run(self, lm, state, input_ids, attention_mask=None, cache=None, with_image=True, attentions=False):
        out = lm(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=state)
        return out.logits, None


class Prefix(Fusion):
    """Image tokens first, then the text; the image is in the LM's cache after the first step."""

    def run(self, lm, state, input_ids, attention_mask=None, cache=None, with_image=True, attentions=False):
        embeds = lm.get_input_embeddings()(input_ids)
        m = state.shape[1] if with_image else 0
        if with_image:
            embeds = torch.cat([state.to(embeds.dtype), embeds], dim=1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask.new_ones(state.shape[:2]), attention_mask], dim=1)
        out = lm(inputs_embeds=embeds, attention_mask=attention_mask, cache=cache, use_cache=cache is not None,
                 output_attentions=attentions)
        att = None
        if attentions:  # mean over layers and heads of each text query's attention to the image tokens
            att = torch.stack([a[:, :, m:, : state.shape[1]] for a in out.attentions]).float().mean(dim=(0, 2))
        return out.logits[:, m:], att


class GatedCrossAttention(nn.Module):
    """Pre-norm cross-attention and MLP, each added through a tanh gate that starts at zero.

    The gates are one per channel (Flamingo's are one per block): a scalar gate gets the sum of
    every channel's gradient, which mostly cancels while the LM ignores the image, so it barely
    opens (on the glyphs demo its tanh stayed under 0.12 in 1,100 steps). Models saved with scalar
    gates load as per-channel gates of that value."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.query = nn.Linear(width, width, bias=False)
        self.key = nn.Linear(width, width, bias=False)
        self.value = nn.Linear(width, width, bias=False)
        self.out = nn.Linear(width, width, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(width))
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.mlp_gate = nn.Parameter(torch.zeros(width))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("attn_gate", "mlp_gate"):  # scalar gates (0.2 before per-channel gates)
            key = prefix + name
            if key in state_dict and state_dict[key].numel() == 1:
                state_dict[key] = state_dict[key].expand_as(getattr(self, name)).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def image_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, heads, M, head_dim] of one batch of images."""
        return self._split(self.key(memory)), self._split(self.value(memory))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        return x.view(b, n, self.heads, w // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], record: Optional[list] = None):
        keys, values = (t.to(x.dtype) for t in kv)
        q = self._split(self.query(self.norm(x)))
        if record is None:
            y = F.scaled_dot_product_attention(q, keys, values)
        else:  # the weights themselves, for attention maps
            weights = (q @ keys.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
            record.append(weights.mean(1))
            y = weights @ values
        y = y.transpose(1, 2).reshape(x.shape)
        x = x + torch.tanh(self.attn_gate) * self.out(y)
        return x + torch.tanh(self.mlp_gate) * self.mlp(self.mlp_norm(x))


class InsertedCrossAttention(Fusion):
    """`GatedCrossAttention` blocks run (by forward pre-hooks) before every `every`-th LM layer.

    The LM's modules and weight names stay as they are (pretrained loading and LoRA see the plain
    LM); the blocks read the image keys/values that `attending` makes current for one forward.
    """

    def __init__(self, lm: PreTrainedModel, every: int):
        super().__init__()
        layers = lm_layers(lm)
        width, heads = lm.config.hidden_size, lm.config.num_attention_heads
        if width % heads:
            heads = 1
        self.at = [i for i in range(len(layers)) if i % every == 0]
        self.blocks = nn.ModuleList(GatedCrossAttention(width, heads) for _ in self.at)
        self._kv: Optional[list] = None
        self._record: Optional[list] = None
        for n, i in enumerate(self.at):
            layers[i].register_forward_pre_hook(functools.partial(self._before_layer, n), with_kwargs=True)

    def image_state(self, memory):
        return [block.image_kv(memory) for block in self.blocks]

    def repeat(self, state, k):
        return [(keys.repeat_interleave(k, dim=0), values.repeat_interleave(k, dim=0)) for keys, values in state]

    def select(self, state, rows):
        return [(keys.index_select(0, rows), values.index_select(0, rows)) for keys, values in state]

    @contextlib.contextmanager
    def attending(self, state: list, record: Optional[list] = None):
        self._kv, self._record = state, record
        try:
            yield
        finally:
            self._kv, self._record = None, None

    def _before_layer(self, n: int, module, args, kwargs):
        if self._kv is None:  # the LM on its own (no image): unchanged
            return None
        if args:
            return (self.blocks[n](args[0], self._kv[n], self._record), *args[1:]), kwargs
        kwargs["hidden_states"] = self.blocks[n](kwargs["hidden_states"], self._kv[n], self._record)
        return args, kwargs

    def run(self, lm, state, input_ids, attention_mask=None, cache=None, with_image=True, attentions=False):
        record = [] if attentions else None
        with self.attending(state, record):
            out = lm(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=cache is not None)
        att = torch.stack(record).float().mean(0) if attentions else None  # mean over blocks (and heads)
        return out.logits, att


def lm_layers(lm: PreTrainedModel) -> nn.ModuleList:
    """The LM's list of decoder layers (`model.layers`, `gpt_neox.layers`, ...)."""
    n = lm.config.num_hidden_layers
    for module in lm.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} decoder layers of {type(lm).__name__}")


def build_fusion(cfg: DecoderConfig, lm: PreTrainedModel) -> Fusion:
    """The fusion `cfg.fusion` names, for the built decoder `lm`."""
    if uses_own_cross_attention(lm.config.model_type, cfg):
        return OwnCrossAttention()
    if cfg.fusion == "prefix":
        return Prefix()
    return InsertedCrossAttention(lm, cfg.cross_attention_every)
