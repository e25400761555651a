"""An n-gram language model over token ids: the count-based baseline neural LMs are compared with.

Two smoothings, both proper distributions over the whole vocabulary (every id in 0..V-1 gets
probability > 0, and the probabilities of one context sum to 1):

- "kneser-ney" (default): interpolated Kneser-Ney with one absolute discount d (Chen & Goodman 1998).
  The highest order uses raw counts, lower orders continuation counts (how many distinct tokens
  precede an n-gram), and the unigram level is interpolated with the uniform distribution 1/V:

      P_k(w | h) = max(c_k(h w) - d, 0) / c_k(h) + d * N1+(h .) / c_k(h) * P_{k-1}(w | h')
      P_0(w)     = 1 / V

  where h' drops the oldest token of h; a context never seen at order k falls back to P_{k-1}.
- "add-k": (c(h w) + k) / (c(h) + k V) on the highest order only.

Each sequence is scored from its first token: the context is padded with n-1 start symbols (-1,
never predicted). Sequences are token ids from the model's own tokenizer, so perplexities are per
token of that tokenizer and comparable with the neural model's.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from deploylm.errors import UsageError

START = -1                          # context padding symbol (not in the vocabulary)
SMOOTHINGS = ("kneser-ney", "add-k")
Context = tuple[int, ...]


@dataclass
class _Table:
    """Counts of one order: context -> {token: count}, with per-context totals and type counts."""

    counts: dict[Context, dict[int, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    totals: dict[Context, int] = field(default_factory=dict)
    types: dict[Context, int] = field(default_factory=dict)

    def finish(self) -> None:
        self.counts = {ctx: dict(row) for ctx, row in self.counts.items()}
        self.totals = {ctx: sum(row.values()) for ctx, row in self.counts.items()}
        self.types = {ctx: len(row) for ctx, row in self.counts.items()}


class NGramLM:
    """An order-`n` language model over token ids 0..vocab_size-1; `fit` it, then score with it."""

    def __init__(self, n: int, vocab_size: int, smoothing: str = "kneser-ney", discount: float = 0.75, k: float = 1.0):
        _check_int("n", n)
        _check_int("vocab_size", vocab_size)
        if smoothing not in SMOOTHINGS:
            raise UsageError(f"n-gram smoothing {smoothing!r}: expected one of {', '.join(SMOOTHINGS)}")
        if not (isinstance(discount, (int, float)) and 0 < discount <= 1):
            raise UsageError(f"n-gram discount {discount!r}: expected a number in (0, 1]")
        if not (isinstance(k, (int, float)) and math.isfinite(k) and k > 0):
            raise UsageError(f"n-gram add-k k={k!r}: expected a positive number")
        self.n, self.vocab_size, self.smoothing = n, vocab_size, smoothing
        self.discount, self.k = float(discount), float(k)
        self.tables = [_Table() for _ in range(n)]   # tables[j]: order j + 1, contexts of j tokens
        self.n_tokens = 0

    def fit(self, sequences: Iterable[Sequence[int]]) -> "NGramLM":
        """Count the n-grams of `sequences` (each a list of token ids); returns self."""
        distinct: set[tuple[int, ...]] = set()   # n-grams (with their left neighbour) seen, for continuation counts
        top = self.tables[-1]
        for seq in sequences:
            padded = [START] * (self.n - 1) + self._checked(seq)
            for i in range(self.n - 1, len(padded)):
                window = tuple(padded[i - self.n + 1:i + 1])       # n symbols ending at token i
                top.counts[window[:-1]][window[-1]] += 1
                distinct.update(window[j:] for j in range(self.n - 1))   # suffixes with a left neighbour
            self.n_tokens += len(padded) - (self.n - 1)
        for gram in distinct:                                       # gram = (left, *context, token)
            order = len(gram) - 1                                   # its suffix gram[1:] has `order` symbols
            self.tables[order - 1].counts[gram[1:-1]][gram[-1]] += 1
        for table in self.tables:
            table.finish()
        return self

    def prob(self, token: int, context: Sequence[int] = ()) -> float:
        """P(token | context); only the last n-1 ids of `context` matter (padded with start symbols)."""
        ctx = self._context(context)
        if self.smoothing == "add-k":
            row, total = self.tables[-1].counts.get(ctx, {}), self.tables[-1].totals.get(ctx, 0)
            return (row.get(token, 0) + self.k) / (total + self.k * self.vocab_size)
        p = 1.0 / self.vocab_size
        for order, table in enumerate(self.tables):                  # order: context length
            sub = ctx[len(ctx) - order:] if order else ()
            total = table.totals.get(sub, 0)
            if total:
                seen = max(table.counts[sub].get(token, 0) - self.discount, 0.0)
                p = seen / total + self.discount * table.types[sub] / total * p
        return p

    def distribution(self, context: Sequence[int] = ()) -> np.ndarray:
        """P(. | context) as a [V] float64 array (sums to 1)."""
        ctx = self._context(context)
        if self.smoothing == "add-k":
            probs = np.full(self.vocab_size, self.k)
            for token, count in self.tables[-1].counts.get(ctx, {}).items():
                probs[token] += count
            return probs / probs.sum()
        probs = np.full(self.vocab_size, 1.0 / self.vocab_size)
        for order, table in enumerate(self.tables):
            sub = ctx[len(ctx) - order:] if order else ()
            total = table.totals.get(sub, 0)
            if total:
                seen = np.zeros(self.vocab_size)
                row = table.counts[sub]
                seen[list(row)] = np.maximum(np.fromiter(row.values(), float, len(row)) - self.discount, 0.0)
                probs = seen / total + self.discount * table.types[sub] / total * probs
        return probs

    def log_likelihood(self, sequences: Iterable[Sequence[int]], score_from: int = 0) -> tuple[float, int]:
        """(sum of natural-log probabilities, number of tokens scored) over `sequences`.

        score_from=k leaves the first k tokens of each sequence unscored (they are still context):
        k=1 scores the positions a neural LM without a start token predicts.
        """
        total, count = 0.0, 0
        for seq in sequences:
            padded = [START] * (self.n - 1) + self._checked(seq)
            for i in range(self.n - 1 + score_from, len(padded)):
                total += math.log(self.prob(padded[i], padded[i - self.n + 1:i]))
                count += 1
        return total, count

    def perplexity(self, sequences: Iterable[Sequence[int]], score_from: int = 0) -> float:
        """exp(-mean log P) per scored token over `sequences`; UsageError when none is scored."""
        total, count = self.log_likelihood(sequences, score_from)
        if count == 0:
            raise UsageError("n-gram perplexity of no tokens: expected at least one non-empty sequence")
        return math.exp(-total / count)

    def _context(self, context: Sequence[int]) -> Context:
        ctx = tuple(int(t) for t in context)[-(self.n - 1):] if self.n > 1 else ()
        return (START,) * (self.n - 1 - len(ctx)) + ctx

    def _checked(self, seq: Sequence[int]) -> list[int]:
        ids = [int(t) for t in seq]
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise UsageError(f"token id {bad} is outside the n-gram model's vocabulary 0..{self.vocab_size - 1}")
        return ids


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"n-gram {name}={value!r}: expected an integer >= 1")
