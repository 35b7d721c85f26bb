"""Beam search over a decoding pass, with transformers' semantics (hypothesis scores, length
penalty, early stopping); the bookkeeping is `mmcap.generation.beams`.

Images whose beams can no longer improve leave the search: their rows stop being decoded (the
pass's `keep`), and their final hypotheses wait in `done` while the rest of the batch goes on.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from mmcap.generation.beams import NEG, Finished, Running, next_beams, top_candidates
from mmcap.generation.config import GenerationConfig
from mmcap.generation.output import GenerationOutput
from mmcap.generation.passes import DecodingPass


def beam_search(dec: DecodingPass, start: torch.Tensor, eos: int, pad: int, cfg: GenerationConfig,
                drop_finished: bool = True) -> GenerationOutput:
    """`start` [B, L]: BOS and the prompt of every row (L the same for all). `drop_finished=False`
    decodes every image to the end (the same results, more work: for tests)."""
    k, (b, prompt_len) = cfg.num_beams, start.shape
    # the pass's kernels may give each row's best log-probs straight from the logits (not where
    # sampling or banned n-grams need them all)
    row_top = None if cfg.do_sample or cfg.no_repeat_ngram_size > 0 else getattr(dec, "row_top", None)
    # ... or from the LM head's own kernel, the logits never written (`HeadRows`)
    top = row_top is not None and getattr(dec, "fused_top", False)
    logits, att = dec(start, top=True) if top else dec(start)  # the first step runs on the un-expanded batch
    dec.expand(k)
    logits = logits.repeat_interleave(k, 0)
    att = att.repeat_interleave(k, 0) if att is not None else None
    att_shape = (cfg.max_new_tokens, dec.memory.shape[1]) if dec.attentions else None
    running = Running.first(start, k, prompt_len + cfg.max_new_tokens, pad, att_shape)
    finished = Finished.empty(running)
    shrink = drop_finished and not dec.attentions and not getattr(dec, "static_rows", False)
    images, done = torch.arange(b, device=start.device), None  # the image of each row of the state

    cur = prompt_len  # the position the next token takes
    for step in range(cfg.max_new_tokens):
        if step > 0:
            seqs = running.seqs.view(-1, running.seqs.shape[2])[:, :cur]
            logits, att = dec(seqs, top=True) if top else dec(seqs)
        cand = top_candidates(logits if row_top else _log_softmax(logits), running, cur, step, cfg, eos, att, row_top)
        running, parent = next_beams(cand, k)
        finished.add(cand, step, cfg)
        cur += 1
        finished.update_improvable(running, cur - prompt_len, cfg)
        if not _goes_on(finished, cand, cfg):
            break
        n = len(images)
        dec.reorder((parent + torch.arange(n, device=parent.device)[:, None] * k).view(-1))
        if shrink and not bool(finished.improvable.all()):
            stay, gone = finished.improvable[:, 0].nonzero()[:, 0], (~finished.improvable[:, 0]).nonzero()[:, 0]
            if done is None:
                done = Finished(**{f: getattr(finished, f).clone() for f in ("seqs", "scores", "logp", "lengths")},
                                is_fin=None, improvable=None, att=None)
            done.put(images[gone], finished.take(gone))
            dec.keep(stay)
            images, running, finished = images[stay], running.take(stay), finished.take(stay)

    if done is not None:  # every image's hypotheses, in the order of the batch
        done.put(images, finished)
        finished = done
    return _output(finished, prompt_len)


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    # in place where the logits are a fresh tensor of their own (unused after this): writing into
    # them instead of a new [rows, vocab] tensor takes a fifth off this pass
    return torch.log_softmax(logits, -1, out=logits) if logits.is_contiguous() else F.log_softmax(logits, -1)


def _goes_on(finished: Finished, cand, cfg: GenerationConfig) -> bool:
    """Whether any image can still improve, beams are open, and not every candidate just finished."""
    open_beams = not (bool(finished.is_fin.all()) and cfg.early_stopping is True)
    return bool(finished.improvable.any()) and open_beams and not bool(cand.hits.all())


def _output(finished: Finished, prompt_len: int) -> GenerationOutput:
    b, k = finished.scores.shape
    lengths = finished.lengths[:, 0]
    t = int(lengths.max())
    sequences = finished.seqs[:, 0, prompt_len : prompt_len + t]
    cross: Optional[list] = None
    if finished.att is not None:
        cross = [finished.att[i, 0, : lengths[i]] for i in range(b)]
    found = (finished.scores > NEG / 2).tolist()  # slots never filled keep a score near NEG
    hypotheses = [[(finished.seqs[i, j, prompt_len : prompt_len + finished.lengths[i, j]], float(finished.logp[i, j]))
                   for j in range(k) if found[i][j]]
                  for i in range(b)]
    return GenerationOutput(sequences, lengths, finished.logp[:, 0], cross, hypotheses)
