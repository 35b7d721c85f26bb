"""BLEU-1..4 as coco-caption computes it (pycocoevalcap's ``Bleu``), without the printing.

Details that make coco-caption's numbers differ from other BLEU implementations, kept here:
the brevity penalty uses the reference length *closest* to the candidate's (ties go to
the shorter reference); precisions are smoothed with ``tiny``/``small`` epsilons so a
zero count gives a tiny score instead of a division error; BLEU-n is the geometric mean
of the 1..n precisions; the per-caption scores use the same formula on one caption.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

__all__ = ["bleu_scores"]

_TINY = 1e-15  # keeps a zero match count from zeroing the product
_SMALL = 1e-9  # keeps a zero guess count from dividing by zero


def _ngrams(words: list[str], max_n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1))


def _bleu_from_counts(correct: Sequence[float], guess: Sequence[float], test_len: float, ref_len: float) -> list[float]:
    scores, product = [], 1.0
    for k in range(len(correct)):
        product *= (correct[k] + _TINY) / (guess[k] + _SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + _TINY) / (ref_len + _SMALL)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def bleu_scores(
    candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Corpus and per-caption BLEU-1..``max_n`` of tokenised captions.

    ``candidates[i]`` is scored against ``references[i]`` (at least one each); captions are
    space-separated tokens (see :func:`mmcap.metrics.ptb.tokenize_captions`). Returns
    ``(corpus, per_caption)`` with shapes ``(max_n,)`` and ``(len(candidates), max_n)``.
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    total_correct, total_guess = [0] * max_n, [0] * max_n
    total_test, total_ref = 0, 0
    per_caption = []
    for candidate, refs in zip(candidates, references):
        if not refs:
            raise ValueError("every candidate needs at least one reference")
        words = candidate.split()
        test_len = len(words)
        counts = _ngrams(words, max_n)
        max_ref_counts: Counter[tuple[str, ...]] = Counter()
        ref_lens = []
        for ref in refs:
            ref_words = ref.split()
            ref_lens.append(len(ref_words))
            max_ref_counts |= _ngrams(ref_words, max_n)  # | keeps the maximum count
        ref_len = min((abs(length - test_len), length) for length in ref_lens)[1]
        correct = [0] * max_n
        for gram, count in counts.items():
            correct[len(gram) - 1] += min(count, max_ref_counts[gram])
        guess = [max(0, test_len - k) for k in range(max_n)]
        per_caption.append(_bleu_from_counts(correct, guess, test_len, ref_len))
        total_correct = [a + b for a, b in zip(total_correct, correct)]
        total_guess = [a + b for a, b in zip(total_guess, guess)]
        total_test += test_len
        total_ref += ref_len
    corpus = _bleu_from_counts(total_correct, total_guess, total_test, total_ref)
    return np.array(corpus), np.array(per_caption, dtype=float).reshape(len(candidates), max_n)
