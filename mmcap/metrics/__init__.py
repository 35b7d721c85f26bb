"""Caption metrics equal to coco-caption's (pycocoevalcap), without its Java tokenizer.

``caption_metrics`` is the one call evaluation needs: raw captions in, the coco-caption
suite out. Each metric also lives in its own module (``bleu_scores``, ``rouge_l``,
``cider_d``/``CiderD``, ``meteor_scores``) working on tokenised captions, and ``ptb`` holds the tokenizer. SPICE is left
out: it downloads Stanford CoreNLP at run time.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

from mmcap.metrics.bleu import bleu_scores
from mmcap.metrics.cider import CiderD, cider_d
from mmcap.metrics.meteor import meteor_scores
from mmcap.metrics.ptb import ptb_tokenize, tokenize_captions
from mmcap.metrics.rouge import rouge_l

__all__ = [
    "caption_metrics",
    "evaluate_captions",
    "exact_match_rate",
    "bleu_scores",
    "rouge_l",
    "cider_d",
    "CiderD",
    "meteor_scores",
    "ptb_tokenize",
    "tokenize_captions",
]


def _check_keys(references: Mapping[Hashable, Sequence[str]], predictions: Mapping[Hashable, str]) -> None:
    missing = [k for k in references if k not in predictions]
    extra = [k for k in predictions if k not in references]
    if missing or extra:
        raise ValueError(
            "predictions and references must have the same keys; "
            f"missing predictions for {missing[:10]!r}{' ...' if len(missing) > 10 else ''}, "
            f"predictions without references for {extra[:10]!r}{' ...' if len(extra) > 10 else ''}"
        )
    empty = [k for k, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"no reference captions for {empty[:10]!r}")
    if not references:
        raise ValueError("no captions to score")


def caption_metrics(
    references: Mapping[Hashable, Sequence[str]], predictions: Mapping[Hashable, str], meteor: bool = True
) -> dict[str, float | None]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr-D of raw captions, as coco-caption computes them.

    Args:
        references: ``{key: [reference caption, ...]}``, raw text, at least one per key.
        predictions: ``{key: predicted caption}``, raw text, with exactly the keys of
            ``references`` (a ValueError names any missing or extra key).
        meteor: compute METEOR (starts a JVM, a few seconds).

    Both sides are PTB-tokenised in pure Python (:mod:`mmcap.metrics.ptb`) exactly as
    pycocoevalcap does with Java. Returns ``{"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4",
    "METEOR", "ROUGE_L", "CIDEr"}``; ``METEOR`` is None (never 0) when not asked for or
    when Java or pycocoevalcap is unavailable (logged once).
    """
    _check_keys(references, predictions)
    keys = list(references)
    refs_by_key = tokenize_captions({k: list(references[k]) for k in keys})
    preds_by_key = tokenize_captions({k: [predictions[k]] for k in keys})
    refs = [refs_by_key[k] for k in keys]
    preds = [preds_by_key[k][0] for k in keys]

    bleu_corpus, _ = bleu_scores(preds, refs)
    meteor_corpus = meteor_scores(preds, refs) if meteor else None
    return {
        **{f"BLEU-{n + 1}": float(score) for n, score in enumerate(bleu_corpus)},
        "METEOR": None if meteor_corpus is None else float(meteor_corpus[0]),
        "ROUGE_L": rouge_l(preds, refs)[0],
        "CIDEr": cider_d(preds, refs)[0],
    }


def evaluate_captions(references: Mapping[Hashable, Sequence[str]], predictions: Mapping[Hashable, str],
                      meteor: bool = True) -> dict[str, float | None]:
    """`caption_metrics` plus `exact_match`: the share of predictions equal to one of their
    references (case and spacing ignored). What `mmcap eval` and the test split report."""
    metrics = dict(caption_metrics(references, predictions, meteor=meteor))
    metrics["exact_match"] = exact_match_rate(references, predictions)
    return metrics


def exact_match_rate(references: Mapping[Hashable, Sequence[str]], predictions: Mapping[Hashable, str]) -> float:
    def norm(text: str) -> str:
        return " ".join(text.lower().split())

    hits = sum(norm(p) in {norm(r) for r in references[k]} for k, p in predictions.items())
    return hits / max(1, len(predictions))
