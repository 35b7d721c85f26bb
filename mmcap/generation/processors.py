"""Logits processors and warpers, with transformers' semantics: banned n-grams, the minimum
length, sampling's temperature/top-k/top-p; and the row-wise top-k beam search uses."""
from __future__ import annotations

import torch

from mmcap.generation.config import GenerationConfig


def topk_rows(x: torch.Tensor, k: int, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.topk(x, k)` of each row of a 2-D `x` with long rows (a vocabulary), found through the
    maxima of chunks of `chunk` entries: the row's top k lie in the k chunks with the largest
    maxima, so one cheap max pass and a top-k of k * chunk candidates replace a top-k of the row.
    Ties between equal values may pick other indices than torch.topk, whose own choice among ties
    is unspecified."""
    n, v = x.shape
    full = v // chunk
    if full <= k or x.stride(-1) != 1:
        return torch.topk(x, k)
    maxima = x[:, : full * chunk].view(n, full, chunk).amax(-1)
    if v > full * chunk:  # the short last chunk
        maxima = torch.cat([maxima, x[:, full * chunk :].amax(-1, keepdim=True)], 1)
    chunks = torch.topk(maxima, k).indices  # [n, k]
    positions = (chunks[:, :, None] * chunk + torch.arange(chunk, device=x.device)).view(n, -1)
    outside = positions >= v
    values = x.gather(1, positions.clamp_(max=v - 1)).masked_fill_(outside, float("-inf"))
    best, where = torch.topk(values, k)
    return best, positions.gather(1, where)


def ban_repeated_ngrams(scores: torch.Tensor, seqs: torch.Tensor, n: int) -> torch.Tensor:
    """Forbid any token that would repeat an n-gram already in the row (as transformers does)."""
    t = seqs.shape[1]
    if n <= 0 or t + 1 < n:
        return scores
    rows = seqs.tolist()
    for i, row in enumerate(rows):
        prefix = tuple(row[t - n + 1 :]) if n > 1 else ()
        banned = [row[j + n - 1] for j in range(t - n + 1) if tuple(row[j : j + n - 1]) == prefix]
        if banned:
            scores[i, banned] = float("-inf")
    return scores


def warp_for_sampling(scores: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus), keeping at least one token."""
    if cfg.temperature != 1.0:
        scores = scores / cfg.temperature
    if 0 < cfg.top_k < scores.shape[-1]:
        kth = torch.topk(scores, cfg.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = sorted_scores.softmax(-1)
        drop = (probs.cumsum(-1) - probs) > cfg.top_p  # mass before this token already exceeds top_p
        drop[..., 0] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores


def process(scores: torch.Tensor, seqs: torch.Tensor, step: int, cfg: GenerationConfig, eos: int) -> torch.Tensor:
    """Bans what `cfg` forbids at `step` (repeated n-grams; EOS before `min_new_tokens`); -inf, in place where it can."""
    scores = ban_repeated_ngrams(scores, seqs, cfg.no_repeat_ngram_size)
    if step < cfg.min_new_tokens:
        scores[:, eos] = float("-inf")
    return scores
