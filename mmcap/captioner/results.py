"""What captioning returns: `CaptionResult` per image, and `Captions`, `caption`'s familiar tuple."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from mmcap.generation import GenerationOutput


@dataclass
class CaptionResult:
    """One image's caption and what decoding knows about it (`Captioner.caption_details`)."""

    caption: str
    log_prob: float  # the model's log-probability of the generated tokens, EOS included
    words: list[str]  # one display string per generated token, "" for the end token
    attention: Optional[torch.Tensor] = None  # (words, H, W) cross-attention, mean over heads and layers
    # beam search: every finished caption with its log-prob, best first ([0] is `caption`)
    alternatives: list[tuple[str, float]] = field(default_factory=list)
    # beam search: each alternative's generated tokens (EOS included), what its ranking score
    # log_prob / tokens ** length_penalty divides by
    alternative_tokens: list[int] = field(default_factory=list)


class Captions(tuple):
    """What `caption(..., return_scores=True or return_attention=True)` returns: the same tuple as
    always, `(captions[, log_probs][, attention])`, which also carries `.words`: per caption, the
    generated words, one per attention map (`plot_attention(image, result)` takes it whole)."""

    def __new__(cls, items: tuple, words=None, attention=None):  # defaults: copy and pickle call it with items only
        out = super().__new__(cls, items)
        out.words, out.attention = words, attention
        return out

    @classmethod
    def of(cls, results: list[CaptionResult], single: bool, scores: bool, attention: bool):
        """What `caption` returns for `results`: the captions alone (a `str` for a single image),
        else a `Captions` with the log-probs and attention maps asked for."""
        captions = [r.caption for r in results]
        if not (scores or attention):
            return captions[0] if single else captions

        def shaped(per_image):
            return per_image[0] if single else per_image

        items = [shaped(captions)]
        if scores:
            items.append(shaped(torch.tensor([r.log_prob for r in results])))
        maps = shaped([r.attention for r in results]) if attention else None
        if attention:
            items.append(maps)
        return cls(tuple(items), shaped([r.words for r in results]), maps)


def results_of(out: GenerationOutput, tokenizer, grid: Optional[tuple[int, int]]) -> list[CaptionResult]:
    """A `CaptionResult` per image of a `generate` output; `grid` (H, W) shapes the attention maps."""
    tok = tokenizer
    results = []
    for i, n in enumerate(out.lengths.tolist()):
        ids = out.sequences[i, :n].tolist()
        words = ["" if t == tok.eos_id else w for t, w in zip(ids, tok.tokens(ids))]
        attention = out.cross_attentions[i].reshape(n, *grid).cpu() if grid else None
        hypotheses = out.hypotheses[i] if out.hypotheses else []
        alternatives = [(tok.decode(seq), logp) for seq, logp in hypotheses]
        results.append(CaptionResult(tok.decode(ids), float(out.scores[i]), words, attention, alternatives,
                                     [len(seq) for seq, _ in hypotheses]))
    return results
