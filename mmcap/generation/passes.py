"""The decoding pass: what a search runs over, declared once (`DecodingPass`), and which pass a
decoder gets (`decoding_pass`).

A pass feeds the tokens its cache has not seen and returns the next token's logits; beam search
repeats its rows per beam (`expand`), reorders them (`reorder`) and drops the images it has
finished with (`keep`). Three passes implement it:
- `GPT2Decoding` (`gpt2_pass`): GPT-2's own cross-attention, with fewer kernels per token;
- `HFDecoding` (`hf_pass`): the transformers forward of any decoder with its own cross-attention
  (BERT; GPT-2 when attention maps are asked for or the cache is off);
- `LMDecoding` (`lm_pass`): a causal LM that reads the image through a prefix or inserted
  cross-attention blocks (`mmcap.model.fusion`).
"""
from __future__ import annotations

import functools
import logging
from typing import Optional, Protocol

import torch

from mmcap.generation.attention import AttentionBackend, torch_attention
from mmcap.generation.beams import RowTop
from mmcap.generation.compiled_pass import CompiledGPT2Decoding
from mmcap.generation.gpt2_pass import GPT2Decoding
from mmcap.generation.hf_pass import HFDecoding
from mmcap.generation.lm_pass import LMDecoding

log = logging.getLogger(__name__)


class DecodingPass(Protocol):
    """One decoding pass over a batch of images (rows: one per image, then one per beam)."""

    memory: torch.Tensor  # the image tokens of the rows decoded [rows or images, M, D]
    attentions: bool  # whether calls return the image attention of the last query
    # optional: logits, k -> each row's k best log-probs and their tokens, without writing the
    # log-probs out (`AttentionState.log_softmax_top`); beam search reads it with getattr
    row_top: Optional[RowTop]
    # optional: calls (and `step_rows`) with `top=True` return `beams.HeadRows` in place of logits,
    # which only `row_top` reads: the LM head and the top k in one kernel (`GPT2Decoding`, int8 on AMX)
    fused_top: bool
    # optional: True where the pass keeps every image's rows to the end (the searches never call
    # `keep`): a compiled pass, whose graph is made for one shape (`CompiledGPT2Decoding`)
    static_rows: bool

    def __call__(self, seqs: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Logits [N, V] (fp32) of the token after `seqs` [N, t], and image attention [N, M] or None."""

    def expand(self, k: int) -> None:
        """Repeat every row k times (after the first step, which runs on the un-expanded batch)."""

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i continues from row `rows[i]` (beam search's new order)."""

    def keep(self, images: torch.Tensor) -> None:
        """Decode only `images` (positions among the images decoded so far), with their beams' rows."""


def decoding_pass(model, memory: torch.Tensor, *, fusion=None, use_cache: bool = True, attentions: bool = False,
                  max_len: int, attention: AttentionBackend = torch_attention) -> DecodingPass:
    """The pass for `model` reading image tokens `memory`: through `fusion` where the fusion is not
    the decoder's own cross-attention, else GPT-2's lean pass where it applies, else transformers'.
    `attention` makes the lean pass's attention state (`mmcap.generation.attention`); one with
    `compile_options` asks for the lean pass with compiled steps (`compiled_pass`)."""
    compiled = getattr(attention, "compile_options", None) is not None
    if fusion is not None and not fusion.own_cross_attention:
        dec = LMDecoding(model, fusion, memory, use_cache, attentions)
    elif use_cache and GPT2Decoding.supports(model, attentions):
        if compiled:
            return CompiledGPT2Decoding(model, memory, max_len=max_len, attention=attention)
        return GPT2Decoding(model, memory, max_len=max_len, attention=attention)
    else:
        dec = HFDecoding(model, memory, use_cache, attentions)
    if compiled:
        _eager_only(type(dec).__name__)
    return dec


@functools.lru_cache(maxsize=None)
def _eager_only(name: str) -> None:
    log.warning("mmcap: compiled decoding steps are GPT-2's lean pass (cross-attention, cache on, no attention "
                "maps); this decoder decodes through %s, eagerly", name)

