"""ROUGE-L as coco-caption computes it (pycocoevalcap's ``Rouge``).

Per caption: the longest common subsequence with each reference gives a precision and a
recall; the *maximum* precision and the *maximum* recall over the references (possibly
from different references) combine into an F-measure with beta = 1.2. The corpus score
is the mean over captions. Captions are split on single spaces, as coco-caption does, so
an empty caption is one empty token rather than nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["rouge_l", "lcs_length"]

BETA = 1.2


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _rouge_l_one(candidate: str, refs: Sequence[str]) -> float:
    cand = candidate.split(" ")
    precision, recall = 0.0, 0.0
    for ref in refs:
        ref_tokens = ref.split(" ")
        lcs = lcs_length(ref_tokens, cand)
        precision = max(precision, lcs / len(cand))
        recall = max(recall, lcs / len(ref_tokens))
    if precision == 0 or recall == 0:
        return 0.0
    return (1 + BETA**2) * precision * recall / (recall + BETA**2 * precision)


def rouge_l(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, np.ndarray]:
    """Mean and per-caption ROUGE-L of tokenised captions (``candidates[i]`` vs ``references[i]``)."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if any(not refs for refs in references):
        raise ValueError("every candidate needs at least one reference")
    scores = np.array([_rouge_l_one(c, refs) for c, refs in zip(candidates, references)], dtype=float)
    return float(scores.mean()) if len(scores) else 0.0, scores
