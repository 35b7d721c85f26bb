"""CIDEr-D as coco-caption computes it (pycocoevalcap's ``Cider``), reusable for SCST rewards.

Each caption becomes, for n = 1..4, a vector of n-gram counts weighted by
``log(N) - log(max(1, df))``: N images, df the number of images whose references contain
the n-gram. A candidate scores, per reference and per n, the cosine similarity with the
candidate's weights clipped at the reference's (the "-D": repeating a word earns nothing),
times a Gaussian penalty ``exp(-delta**2 / (2 * sigma**2))`` on the length difference. The
score averages over n and references and is multiplied by 10.

Quirk kept for equality with coco-caption: the "length" in the penalty counts the
caption's bigrams (len - 1 words), not its words.

coco-caption takes df and N from the references of the captions being scored, so a
single image scores 0 (every n-gram is in every "document"). Self-critical training needs
stable rewards from a few images at a time, so :class:`CiderD` can instead take df and N
once from a training corpus.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["CiderD", "cider_d"]

Ngram = str  # the n words joined by single spaces: a str hashes once, a tuple on every lookup


def _ngrams(words: list[str], n: int) -> list[Ngram]:
    return words if n == 1 else [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]


@dataclass(frozen=True)
class _Caption:
    """A caption's tf-idf weights and their norm for each n, and its bigram count."""

    weights: tuple[dict[Ngram, float], ...]
    norms: np.ndarray
    length: int


@dataclass(frozen=True)
class _References:
    """One image's reference captions as dense arrays over the n-grams they contain.

    ``columns`` maps each n-gram to its column; ``order[j]`` is column j's n - 1 as a
    one-hot row, so ``x @ order`` sums a row of per-column terms into one sum per n.
    """

    columns: dict[Ngram, int]
    order: np.ndarray  # (columns, max_n)
    weights: np.ndarray  # (references, columns)
    norms: np.ndarray  # (references, max_n)
    lengths: np.ndarray  # (references,)


class CiderD:
    """CIDEr-D scorer (n = 1..4, sigma = 6, clipped, x10) with reusable document frequencies.

    Args:
        corpus_references: one list of tokenised reference captions per image of a corpus
            (e.g. the training set). Document frequencies and N come from it, once.
            ``None`` (default): they come from the ``references`` given to each
            :meth:`score` call, which makes :meth:`score` equal pycocoevalcap's ``Cider``.
        max_n: longest n-gram.
        sigma: width of the Gaussian length penalty.
        cache_size: how many images' reference vectors to keep between calls (with
            ``corpus_references``); the oldest are dropped first.

    Captions are tokenised strings (:func:`mmcap.metrics.ptb.ptb_tokenize`). Candidates
    that share a reference list (k samples of one image) are scored together against
    that image's reference vectors, built once per call and cached across calls.

    Example::

        scorer = CiderD(train_references)  # [[ref, ...], ...] for every training image
        rewards = scorer.score(sampled_captions, references_of_each_sample)  # np.ndarray
    """

    def __init__(
        self,
        corpus_references: Iterable[Sequence[str]] | None = None,
        max_n: int = 4,
        sigma: float = 6.0,
        cache_size: int = 4096,
    ):
        self.max_n = max_n
        self.sigma = sigma
        self.cache_size = cache_size
        self._corpus_idf: tuple[dict[Ngram, float], float] | None = None
        self._ref_cache: dict[tuple[str, ...], _References] = {}
        if corpus_references is not None:
            self._corpus_idf = self._idf(corpus_references)

    def _idf(self, references: Iterable[Sequence[str]]) -> tuple[dict[Ngram, float], float]:
        """``log(N) - log(df)`` for every n-gram of the references, and ``log(N)``.

        ``log(N)`` is also the weight of an n-gram no reference has: coco-caption counts
        it as if in one document, log(max(1, df)) = 0.
        """
        df: defaultdict[Ngram, int] = defaultdict(int)
        n_images = 0
        for refs in references:
            n_images += 1
            seen = set()
            for ref in refs:
                words = ref.split()
                for n in range(1, self.max_n + 1):
                    seen.update(_ngrams(words, n))
            for gram in seen:
                df[gram] += 1
        if n_images == 0:
            raise ValueError("no reference lists to take document frequencies from")
        log_n = math.log(n_images)
        return {gram: log_n - math.log(count) for gram, count in df.items()}, log_n

    def _caption(self, sentence: str, idf: dict[Ngram, float], log_n: float) -> _Caption:
        words = sentence.split()
        weights, norms = [], []
        for n in range(1, self.max_n + 1):
            w: dict[Ngram, float] = {}
            for gram in _ngrams(words, n):  # adding the idf once per occurrence gives tf * idf
                w[gram] = w.get(gram, 0.0) + idf.get(gram, log_n)
            weights.append(w)
            norms.append(math.sqrt(sum(x * x for x in w.values())))
        return _Caption(tuple(weights), np.array(norms), max(0, len(words) - 1))  # bigram count, as coco-caption

    def _references(self, refs: Sequence[str], idf: dict[Ngram, float], log_n: float) -> _References:
        captions = [self._caption(r, idf, log_n) for r in refs]
        columns: dict[Ngram, int] = {}
        order_rows = []
        for n in range(self.max_n):
            for caption in captions:
                for gram in caption.weights[n]:
                    if gram not in columns:
                        columns[gram] = len(columns)
                        order_rows.append(n)
        weights = np.zeros((len(refs), len(columns)))
        for i, caption in enumerate(captions):
            for w in caption.weights:
                for gram, value in w.items():
                    weights[i, columns[gram]] = value
        order = np.zeros((len(columns), self.max_n))
        order[np.arange(len(columns)), order_rows] = 1.0
        return _References(
            columns, order, weights, np.stack([c.norms for c in captions]), np.array([c.length for c in captions])
        )

    def _score_image(self, candidates: list[_Caption], refs: _References) -> np.ndarray:
        """Scores of candidates that share one image's references."""
        cand = np.zeros((len(candidates), len(refs.columns)))
        for i, caption in enumerate(candidates):
            for w in caption.weights:
                for gram, value in w.items():
                    j = refs.columns.get(gram)
                    if j is not None:
                        cand[i, j] = value
        # clipped dot products per (candidate, reference, n): min(c, r) * r summed over n-grams
        dots = (np.minimum(cand[:, None, :], refs.weights[None]) * refs.weights[None]) @ refs.order
        norms = np.stack([c.norms for c in candidates])[:, None, :] * refs.norms[None]
        dots = np.divide(dots, norms, out=dots, where=norms != 0)  # coco-caption skips zero norms
        delta = np.array([c.length for c in candidates])[:, None] - refs.lengths[None]
        penalty = np.exp(-(delta.astype(float) ** 2) / (2 * self.sigma**2))
        return (dots.sum(-1) * penalty).sum(-1) / self.max_n / len(refs.lengths) * 10.0

    def score(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
        """CIDEr-D of each tokenised candidate against its own reference list.

        ``candidates[i]`` is scored against ``references[i]``; several candidates may share
        the same references (e.g. k samples per image). Returns a float array of
        ``len(candidates)`` scores; their mean is the corpus CIDEr-D.
        """
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
        if any(not refs for refs in references):
            raise ValueError("every candidate needs at least one reference")
        if not candidates:
            return np.zeros(0)
        if self._corpus_idf is None:
            # coco-caption: df over the images being scored, one document per candidate
            (idf, log_n), cache = self._idf(references), {}
        else:
            (idf, log_n), cache = self._corpus_idf, self._ref_cache
        by_image: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for i, refs in enumerate(references):
            by_image[tuple(refs)].append(i)
        scores = np.empty(len(candidates))
        for key, rows in by_image.items():
            refs = cache.get(key)
            if refs is None:
                refs = self._references(key, idf, log_n)
                if cache is self._ref_cache and self.cache_size > 0:
                    if len(cache) >= self.cache_size:
                        del cache[next(iter(cache))]  # the oldest entry
                    cache[key] = refs
            scores[rows] = self._score_image([self._caption(candidates[i], idf, log_n) for i in rows], refs)
        return scores


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, np.ndarray]:
    """Mean and per-caption CIDEr-D with coco-caption's document frequencies (those of ``references``)."""
    scores = CiderD().score(candidates, references)
    return (float(scores.mean()) if len(scores) else 0.0), scores
