"""What decoding returns, and one output put together from the outputs of groups of images."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # [B, T] generated ids (no BOS), EOS included when reached, then PAD
    lengths: torch.Tensor  # [B] generated tokens, EOS included
    scores: torch.Tensor  # [B] sum of the model's log-probs of the generated tokens
    cross_attentions: Optional[list[torch.Tensor]] = None  # per item [lengths[i], N]
    # beam search: per item, every finished hypothesis as (ids, log-prob), best first ([0] is the result)
    hypotheses: Optional[list[list[tuple[torch.Tensor, float]]]] = None


def merged(parts: list[tuple[list[int], GenerationOutput]], b: int, pad: int) -> GenerationOutput:
    """One output for `b` images from the outputs of groups of them (`rows`: their places)."""
    first = parts[0][1]
    width = max(out.sequences.shape[1] for _, out in parts)
    sequences = first.sequences.new_full((b, width), pad)
    lengths, scores = first.lengths.new_zeros(b), first.scores.new_zeros(b)
    cross = [None] * b if first.cross_attentions is not None else None
    hypotheses = [None] * b if first.hypotheses is not None else None
    for rows, out in parts:
        index = torch.tensor(rows, device=sequences.device)
        sequences[index, : out.sequences.shape[1]] = out.sequences
        lengths[index], scores[index] = out.lengths, out.scores
        for j, i in enumerate(rows):
            if cross is not None:
                cross[i] = out.cross_attentions[j]
            if hypotheses is not None:
                hypotheses[i] = out.hypotheses[j]
    return GenerationOutput(sequences, lengths, scores, cross, hypotheses)
