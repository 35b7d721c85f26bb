"""Beam search over a stream of images with slot refill: as an image finishes, its beams' rows take
the next image, so the decoder's rows stay full until the stream runs dry.

Batch-at-a-time decoding runs a batch until its longest caption ends, its rows emptying as images
finish, and every step pays a part that does not depend on its rows (the weights read once,
Python, kernel calls): fewer steps with every row busy save that part. Here the batch is a fixed set of image
slots of k rows each; a slot's rows sit at their own positions (the pass's `step_rows`: a refilled
slot starts again at BOS while the others go on), and each image's search is the one
`beam_search` runs for it alone: the same candidates, finished hypotheses and stopping rule, so the
same caption and log-prob (to the float rounding of other batch shapes).

What it needs: a pass with `step_rows` and `admit` (GPT-2's lean pass over an attention state
that keeps a position per row: the inference plan's `refill_attention`), beam search (k > 1)
without sampling or banned n-grams, and no prompt. `supports` says whether a config qualifies.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from mmcap.generation.beams import NEG, Candidates, Finished, Running, RowTop, gather, next_beams
from mmcap.generation.config import GenerationConfig
from mmcap.generation.processors import topk_rows

Image = tuple[Any, torch.Tensor]  # (tag: whatever names the image to the caller, image tokens [M, D])


def supports(cfg: GenerationConfig, prompt: Optional[object] = None) -> bool:
    """Whether `refill_beam_search` decodes `cfg` as `generate` would."""
    return (cfg.num_beams > 1 and not cfg.do_sample and cfg.no_repeat_ngram_size <= 0 and prompt is None
            and cfg.use_cache)


@torch.no_grad()
def refill_beam_search(make_pass: Callable[[torch.Tensor], object], images: Iterable[Image], slots: int, bos: int,
                       eos: int, pad: int, cfg: GenerationConfig) -> Iterator[tuple[Any, torch.Tensor, float]]:
    """(tag, new tokens, log-prob) of each image of `images` as it finishes (not in input order).

    `make_pass(memory)` makes the decoding pass over the first images' tokens [S, M, D]; `slots`
    images decode at a time, each in k = `cfg.num_beams` rows."""
    images = iter(images)
    first = [image for _, image in zip(range(slots), images)]
    if not first:
        return
    s, k, max_len = len(first), cfg.num_beams, 1 + cfg.max_new_tokens
    dec = make_pass(torch.stack([memory for _, memory in first]))
    dec.expand(k)  # before the first step: every slot has k rows from the start
    tags: list[Any] = [tag for tag, _ in first]
    seqs = torch.full((s, k, max_len), pad, dtype=torch.long)
    seqs[:, :, 0] = bos
    running = Running(seqs, torch.zeros(s, k), torch.zeros(s, k), None)
    running.scores[:, 1:] = NEG  # the k rows of a new image are identical: only the first one spreads
    finished = Finished.empty(running)
    steps = torch.zeros(s, dtype=torch.long)  # new tokens of each slot's image so far
    active = torch.ones(s, dtype=torch.bool)
    slot_rows = torch.arange(s)[:, None] * k
    row_top = getattr(dec, "row_top", None)  # the pass's kernels' top k of the log-probs, where offered
    top = row_top is not None and getattr(dec, "fused_top", False)  # ... from the LM head's kernel (`HeadRows`)
    while bool(active.any()):
        positions = steps.repeat_interleave(k)
        tokens = running.seqs.view(s * k, max_len).gather(1, positions[:, None])[:, 0]
        logits = dec.step_rows(tokens, positions, top=True) if top else dec.step_rows(tokens, positions)
        cand = _candidates(logits if row_top else torch.log_softmax(logits, -1, out=logits), running, steps, cfg,
                           eos, row_top)
        running, parent = next_beams(cand, k)
        finished.add(cand, steps[:, None], cfg)
        finished.update_improvable(running, (steps + 1)[:, None], cfg)
        dec.reorder((parent + slot_rows).view(-1))
        steps += active  # an emptied slot stays at BOS (its rows compute, unread, until the last image ends)
        done = active & (~finished.improvable[:, 0] | cand.hits.all(-1) | (steps >= cfg.max_new_tokens)
                         | (finished.is_fin.all(-1) & (cfg.early_stopping is True)))
        if not bool(done.any()):
            continue
        slots = done.nonzero()[:, 0]
        lengths, best = finished.lengths[slots, 0].tolist(), finished.seqs[slots, 0]
        admitted, memories = [], []
        for j, slot in enumerate(slots.tolist()):
            yield tags[slot], best[j, 1 : 1 + lengths[j]], float(finished.logp[slot, 0])
            nxt = next(images, None)
            if nxt is None:  # the stream ran dry: the slot stays at BOS
                active[slot], tags[slot] = False, None
            else:
                tags[slot] = nxt[0]
                admitted.append(slot)
                memories.append(nxt[1])
        if admitted:  # the new images' keys and values in one call per layer
            dec.admit(torch.tensor(admitted), torch.stack(memories))
        _restart(slots, running, finished, bos, pad)
        steps[slots] = 0


def _restart(slots: torch.Tensor, running: Running, finished: Finished, bos: int, pad: int) -> None:
    """`slots` back to a new image's start: BOS in every beam, only the first beam live, nothing finished."""
    running.seqs[slots] = pad
    running.seqs[slots, :, 0] = bos
    running.scores[slots] = NEG
    running.scores[slots, 0] = 0
    running.logp[slots] = 0
    finished.scores[slots], finished.logp[slots], finished.lengths[slots] = NEG, 0, 0
    finished.is_fin[slots], finished.improvable[slots] = False, True


def _candidates(logp: torch.Tensor, running: Running, steps: torch.Tensor, cfg: GenerationConfig,
                eos: int, row_top: Optional[RowTop] = None) -> Candidates:
    """`beams.top_candidates` with a step per slot: the best 2k continuations of each slot's beams
    (`logp` holds the logits where `row_top` gives their rows' best log-probs)."""
    b, k, max_len = running.seqs.shape
    vocab = logp.shape[-1]
    keep = min(2 * k, k * vocab)
    ban = (steps < cfg.min_new_tokens).repeat_interleave(k)  # rows whose image may not end yet
    spare = bool(ban.any())  # one spare candidate per row covers the banned EOS
    chosen, row_tok = (row_top or topk_rows)(logp, min(keep + spare, vocab))
    row_best = chosen.masked_fill((row_tok == eos) & ban[:, None], float("-inf")) if spare else chosen
    scores, pos = torch.topk((row_best.view(b, k, -1) + running.scores[..., None]).view(b, -1), keep)
    idx = pos // row_best.shape[1] * vocab + row_tok.view(b, -1).gather(1, pos)
    beam, tok = idx // vocab, idx % vocab
    cur = steps + 1  # the position each slot's new token takes
    top_seqs = gather(running.seqs, beam)
    top_seqs[torch.arange(b)[:, None], torch.arange(keep)[None, :], cur[:, None]] = tok
    top_logp = gather(running.logp, beam) + chosen.view(b, -1).gather(1, pos)
    hits = (tok == eos) | (cur + 1 >= max_len)[:, None]
    return Candidates(top_seqs, scores, top_logp, None, beam, hits)
