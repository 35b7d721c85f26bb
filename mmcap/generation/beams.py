"""Beam search's bookkeeping, vectorised over images: the running beams, the candidates of a step,
and the finished hypotheses of each image (transformers' `BeamHypotheses`, for a whole batch).

Shapes: b images (those still decoded), k beams each; `Running.seqs` [b, k, max_len] holds BOS, the
prompt and the tokens so far. Scores are sums of log-probs; a finished hypothesis is ranked by its
score over (new tokens ** length_penalty), as in transformers.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, Optional

import torch

from mmcap.generation.config import GenerationConfig
from mmcap.generation.processors import process, topk_rows, warp_for_sampling

NEG = -1.0e9  # the score of a slot that holds nothing (safer than -inf in sums)
# logits [N, V], n -> each row's n best log-probs [N, n] and their tokens (`AttentionState.log_softmax_top`)
RowTop = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


class HeadRows:
    """A step's last hidden rows [N, D], standing in for its logits [N, V] where the pass's LM head
    and its `row_top` run as one kernel (`Int8Linear.head_top`) and the logits are never written.
    Beam search uses only what it uses of logits when `row_top` reads them: the shape, rows
    repeated per beam (the top k is then found once per distinct row), and the top k."""

    def __init__(self, hidden: torch.Tensor, vocab: int, top: RowTop, repeats: int = 1):
        self.hidden, self.vocab, self._top, self.repeats = hidden, vocab, top, repeats

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.hidden.shape[0] * self.repeats, self.vocab))

    def repeat_interleave(self, k: int, dim: int = 0) -> "HeadRows":
        if dim != 0:
            raise ValueError("HeadRows repeats rows only (dim 0)")
        return HeadRows(self.hidden, self.vocab, self._top, self.repeats * k)

    def top(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's n best log-probs [N, n], best first, and their tokens."""
        values, tokens = self._top(self.hidden, n)
        if self.repeats > 1:
            values, tokens = values.repeat_interleave(self.repeats, 0), tokens.repeat_interleave(self.repeats, 0)
        return values, tokens


def gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t [B, K, ...] indexed along dim 1 by idx [B, J]."""
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(t, idx, dim=1)


def slot_order(parent: torch.Tensor) -> torch.Tensor:
    """For the new beams of each image (by score) and their parents' slots `parent` [B, K]: the
    beam each slot takes [B, K]. The first child of a parent keeps the parent's slot, whose cache
    rows then need no copy; the other children fill the slots of parents that had none."""
    order = []
    for row in parent.tolist():
        slots, others = [None] * len(row), []
        for j, p in enumerate(row):
            if slots[p] is None:
                slots[p] = j
            else:
                others.append(j)
        order.append([j if j is not None else others.pop(0) for j in slots])
    return torch.tensor(order, device=parent.device)


class _Rows:
    """Selecting images (rows of dim 0) from every tensor field at once."""

    def take(self, images: torch.Tensor):
        return replace(self, **{f.name: getattr(self, f.name)[images] for f in fields(self)
                                if getattr(self, f.name) is not None})


@dataclass
class Running(_Rows):
    seqs: torch.Tensor  # [b, k, max_len]
    scores: torch.Tensor  # [b, k] search scores (NEG: an empty slot)
    logp: torch.Tensor  # [b, k] the model's log-prob sums
    att: Optional[torch.Tensor]  # [b, k, max_new_tokens, M] image attention per new token

    @classmethod
    def first(cls, start: torch.Tensor, k: int, max_len: int, pad: int, att_shape: Optional[tuple]) -> "Running":
        """k beams per image of `start` [b, L]; all identical, so only the first is expanded."""
        b, prompt_len = start.shape
        seqs = torch.full((b, k, max_len), pad, dtype=torch.long, device=start.device)
        seqs[:, :, :prompt_len] = start[:, None]
        scores = torch.zeros(b, k, device=start.device)
        scores[:, 1:] = NEG
        att = torch.zeros(b, k, *att_shape, device=start.device) if att_shape else None
        return cls(seqs, scores, torch.zeros(b, k, device=start.device), att)


@dataclass
class Candidates:
    """The best `2k` continuations of an image's beams at one step."""

    seqs: torch.Tensor  # [b, 2k, max_len]
    scores: torch.Tensor  # [b, 2k]
    logp: torch.Tensor  # [b, 2k]
    att: Optional[torch.Tensor]
    beam: torch.Tensor  # [b, 2k] the beam each continues
    hits: torch.Tensor  # [b, 2k] ends with EOS or at max_len


def top_candidates(logp: torch.Tensor, running: Running, cur: int, step: int, cfg: GenerationConfig, eos: int,
                   att: Optional[torch.Tensor], row_top: Optional[RowTop] = None) -> Candidates:
    """The best continuations of every image's beams, from the log-probs `logp` [b k, V] of the next
    token (overwritten) and the image attention `att` [b k, M] of this step; `logp` holds the logits
    where `row_top` gives their rows' best log-probs (beam search without sampling or banned n-grams)."""
    b, k, max_len = running.seqs.shape
    vocab = logp.shape[-1]
    keep = min(2 * k, k * vocab)
    seqs = running.seqs.view(b * k, max_len)[:, :cur]
    if cfg.do_sample:
        acc = (logp.view(b, k, vocab) + running.scores[..., None]).view(b * k, vocab)
        # the processors only ban tokens (-inf), so they can work on the fresh sums in place
        acc = process(acc, seqs, step, cfg, eos).view(b, k * vocab)
        idx = torch.multinomial(warp_for_sampling(acc, cfg).softmax(-1), keep)
        scores, chosen = acc.gather(1, idx), None
    else:
        scores, idx, chosen = _best_sums(logp, running.scores, seqs, step, cfg, eos, keep, row_top)
    if chosen is None:
        chosen = logp.view(b, k * vocab).gather(1, idx)
    beam, tok = idx // vocab, idx % vocab
    top_seqs = gather(running.seqs, beam)
    top_seqs[:, :, cur] = tok
    top_logp = gather(running.logp, beam) + chosen
    top_att = None
    if att is not None:
        top_att = gather(running.att, beam)
        top_att[:, :, step] = gather(att.view(b, k, -1), beam)
    return Candidates(top_seqs, scores, top_logp, top_att, beam, (tok == eos) | (cur + 1 >= max_len))


def _best_sums(logp, scores, seqs, step, cfg, eos, keep, row_top=None):
    """The top `keep` of all k * vocab sums of beam score and token log-prob, without writing them
    out: the best `keep` of every beam's row, then the best of those. Returns the sums [b, keep],
    their flat indices over k * vocab, and their tokens' log-probs (None where banned n-grams were
    processed: the caller reads them from `logp`)."""
    b, k = scores.shape
    vocab = logp.shape[-1]
    chosen = None
    if cfg.no_repeat_ngram_size > 0:
        row_best, row_tok = topk_rows(process(logp.clone(), seqs, step, cfg, eos), min(keep, vocab))
    else:  # only min_new_tokens can ban a token (EOS): one spare candidate per row covers it
        ban_eos = step < cfg.min_new_tokens
        chosen, row_tok = (row_top or topk_rows)(logp, min(keep + ban_eos, vocab))
        row_best = chosen.masked_fill(row_tok == eos, float("-inf")) if ban_eos else chosen
    top, pos = torch.topk((row_best.view(b, k, -1) + scores[..., None]).view(b, -1), keep)
    if chosen is not None:
        chosen = chosen.view(b, -1).gather(1, pos)
    return top, pos // row_best.shape[1] * vocab + row_tok.view(b, -1).gather(1, pos), chosen


def next_beams(cand: Candidates, k: int) -> tuple[Running, torch.Tensor]:
    """The running beams for the next step (the best k candidates that did not just finish), each
    in its parent's slot where it can be, and the parents' slots [b, k]."""
    live = cand.scores + cand.hits.float() * NEG
    nxt = torch.topk(live, k).indices
    parent = gather(cand.beam, nxt)
    order = slot_order(parent)
    nxt, parent = nxt.gather(1, order), parent.gather(1, order)
    att = gather(cand.att, nxt) if cand.att is not None else None
    return Running(gather(cand.seqs, nxt), gather(live, nxt), gather(cand.logp, nxt), att), parent


@dataclass
class Finished(_Rows):
    """Each image's k best finished hypotheses, best first, and whether running beams can still beat them."""

    seqs: torch.Tensor  # [b, k, max_len]
    scores: torch.Tensor  # [b, k] ranking scores (length-penalised), NEG where empty
    logp: torch.Tensor  # [b, k] the model's log-prob sums
    lengths: torch.Tensor  # [b, k] new tokens
    is_fin: torch.Tensor  # [b, k] the slot holds a hypothesis
    improvable: torch.Tensor  # [b, 1] a running beam can still beat the worst finished one
    att: Optional[torch.Tensor]

    @classmethod
    def empty(cls, running: Running) -> "Finished":
        b, k, _ = running.seqs.shape
        dev = running.seqs.device
        return cls(running.seqs.clone(), torch.full((b, k), NEG, device=dev), torch.zeros(b, k, device=dev),
                   torch.zeros(b, k, dtype=torch.long, device=dev), torch.zeros(b, k, dtype=torch.bool, device=dev),
                   torch.ones(b, 1, dtype=torch.bool, device=dev),
                   torch.zeros_like(running.att) if running.att is not None else None)

    def add(self, cand: Candidates, step, cfg: GenerationConfig) -> None:
        """Merge the candidates ranked in the first k that just finished, at new-token count step + 1."""
        k = self.scores.shape[1]
        just = cand.hits & (torch.arange(cand.hits.shape[1], device=cand.hits.device) < k)[None, :]
        ranked = cand.scores / ((step + 1) ** cfg.length_penalty)
        ranked = ranked + (self.is_fin.all(-1, keepdim=True) & (cfg.early_stopping is True)).float() * NEG
        ranked = ranked + (~self.improvable).float() * NEG + (~just).float() * NEG
        best = torch.topk(torch.cat([self.scores, ranked], 1), k).indices
        self.seqs = gather(torch.cat([self.seqs, cand.seqs], 1), best)
        self.scores = gather(torch.cat([self.scores, ranked], 1), best)
        self.logp = gather(torch.cat([self.logp, cand.logp], 1), best)
        new_lengths = torch.zeros_like(cand.beam) + (step + 1)  # `step`: an int, or [b, 1] per image (refill)
        self.lengths = gather(torch.cat([self.lengths, new_lengths], 1), best)
        self.is_fin = gather(torch.cat([self.is_fin, just], 1), best)
        if self.att is not None:
            self.att = gather(torch.cat([self.att, cand.att], 1), best)

    def update_improvable(self, running: Running, new_tokens, cfg: GenerationConfig) -> None:
        """Whether a running beam can still beat the worst finished hypothesis (transformers' heuristic)."""
        if cfg.early_stopping == "never" and cfg.length_penalty > 0:
            best_len = cfg.max_new_tokens
        else:
            best_len = new_tokens
        best_possible = running.scores.amax(1, keepdim=True) / (best_len ** cfg.length_penalty)
        worst = torch.where(self.is_fin, self.scores.min(1, keepdim=True).values, NEG)
        self.improvable = self.improvable & (best_possible > worst).any(-1, keepdim=True)

    def put(self, images: torch.Tensor, other: "Finished") -> None:
        """Write `other`'s rows into this batch's rows `images` (the hypotheses of images done with)."""
        for f in ("seqs", "scores", "logp", "lengths"):
            getattr(self, f)[images] = getattr(other, f)
