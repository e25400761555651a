"""Evaluation metrics: exact match, corpus BLEU (sacrebleu), perplexity."""
from __future__ import annotations

import math
import re

# Han ideographs (CJK Unified Ideographs, Extension A, Compatibility, Extensions B..F and the
# compatibility supplement): text written in them has no spaces between words.
_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions equal to their reference after stripping outer whitespace."""
    _check_lengths(predictions, references)
    if not references:
        return 0.0
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)


def bleu_tokenize(references: list[str]) -> str:
    """The sacrebleu tokenization for `references`: "zh" (each Han character a token, the rest as 13a)
    when any reference has a Han character, else the default "13a". 13a splits at spaces and
    punctuation only, so a Chinese sentence would be one token and its BLEU 0 unless exactly right."""
    return "zh" if any(_HAN.search(ref) for ref in references) else "13a"


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (0..100), one reference each, tokenized by sacrebleu as `bleu_tokenize` chooses."""
    import sacrebleu

    _check_lengths(predictions, references)
    if not references:
        return 0.0
    return float(sacrebleu.corpus_bleu(predictions, [references], tokenize=bleu_tokenize(references)).score)


def perplexity(mean_loss: float) -> float:
    """exp(mean token cross-entropy in nats), capped to stay a finite JSON number."""
    return math.exp(min(mean_loss, 50.0))


def _check_lengths(predictions: list[str], references: list[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
