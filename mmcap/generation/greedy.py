"""Greedy decoding and sampling over a decoding pass (`mmcap.generation.passes`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmcap.generation.config import GenerationConfig
from mmcap.generation.output import GenerationOutput
from mmcap.generation.passes import DecodingPass
from mmcap.generation.processors import process, warp_for_sampling


def greedy_or_sample(dec: DecodingPass, start: torch.Tensor, eos: int, pad: int, cfg: GenerationConfig,
                     drop_finished: bool = True) -> GenerationOutput:
    """`start` [B, L]: BOS and the prompt of every row (L the same for all). Greedy rows that reach
    EOS leave the pass (`keep`) unless `drop_finished=False`; sampling keeps every row, so that a
    seed draws the same numbers whatever finishes when."""
    device, (b, prompt_len) = start.device, start.shape
    seqs = start
    done = torch.zeros(b, dtype=torch.bool, device=device)
    lengths = torch.zeros(b, dtype=torch.long, device=device)
    scores = torch.zeros(b, device=device)
    atts = []
    shrink = drop_finished and not dec.attentions and not getattr(dec, "static_rows", False) and not cfg.do_sample
    rows = torch.arange(b, device=device)  # the rows still decoded (all, unless `shrink`)
    for step in range(cfg.max_new_tokens):
        decoded = seqs[rows] if shrink else seqs
        logits, att = dec(decoded)
        logp = F.log_softmax(logits, dim=-1)
        proc = process(logits.clone(), decoded, step, cfg, eos)
        if cfg.do_sample:
            nxt = torch.multinomial(warp_for_sampling(proc, cfg).softmax(-1), 1).squeeze(1)
        else:
            nxt = proc.argmax(-1)
        live = ~done[rows]
        nxt = torch.where(live, nxt, pad)
        scores[rows] += torch.where(live, logp.gather(1, nxt[:, None]).squeeze(1), 0.0)
        lengths[rows] += live.long()
        seqs = torch.cat([seqs, torch.full((b, 1), pad, dtype=seqs.dtype, device=device)], dim=1)
        seqs[rows, -1] = nxt
        if att is not None:
            atts.append(att)
        done[rows] |= nxt == eos
        if done.all():
            break
        if shrink and bool(done[rows].any()):
            stay = (~done[rows]).nonzero()[:, 0]
            dec.keep(stay)
            rows = rows[stay]
    cross = None
    if atts:
        stacked = torch.stack(atts, dim=1)  # [B, T, M]
        cross = [stacked[i, : lengths[i]] for i in range(b)]
    return GenerationOutput(seqs[:, prompt_len:], lengths, scores, cross)
