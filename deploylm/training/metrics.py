"""Evaluation metrics: exact match, corpus BLEU (sacrebleu), perplexity."""
from __future__ import annotations

import math


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions equal to their reference after stripping outer whitespace."""
    _check_lengths(predictions, references)
    if not references:
        return 0.0
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (0..100) with sacrebleu's default 13a tokenization, one reference each."""
    import sacrebleu

    _check_lengths(predictions, references)
    if not references:
        return 0.0
    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def perplexity(mean_loss: float) -> float:
    """exp(mean token cross-entropy in nats), capped to stay a finite JSON number."""
    return math.exp(min(mean_loss, 50.0))


def _check_lengths(predictions: list[str], references: list[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
