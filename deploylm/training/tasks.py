"""Built-in seq2seq tasks: deterministic from a seed, with disjoint train/validation/test splits.

- digits2words: "4096" -> "four thousand ninety-six" for numbers 0..10^6 (convention in numbers.py).
  Stratified by number of digits so that every length is well represented: every number below 1000
  is in the training split (they are the task's vocabulary), each length (1, 2, 3 digits) repeated to
  make 3% of it, and so are the powers of ten 1000..10^6, each repeated to make 1% of it (at least
  once each); the rest of every split is drawn in equal shares
  from the other 4-, 5- and 6-digit numbers (test first, then validation, then train, without
  replacement within a stratum, so no number is in two splits and the held-out splits do not depend
  on the training size). The 4-digit stratum has only 8999 such numbers: when its training share is
  larger than what is left of it, its training numbers repeat.
  Why the powers of ten: 10^6 is the only 7-digit number, and differs from 10^5 only by one zero. At
  0.1% a 1000-step tiny model still read "1000000" as "one hundred thousand"; with 10^6 alone at 1%
  it read "100000" as "one million". Giving 10^3..10^6 the same weight teaches the count of zeros.
  Why the short numbers' share: each once (0.5% of training together) left the 1000-step demo model
  reading every 1- and 2-digit number as three digits ("12" -> "one hundred twenty-two", 0/100
  right, 875/900 of 3-digit ones); at 1% per length it still read "100" as "one", at 2% it got
  999/1000, and at 3% 1000/1000 with the held-out 4-6 digit numbers still 100% (seed 0).
- reverse: "red fox blue" -> "blue fox red", 3..8 words from a 24-word vocabulary; each source
  appears in one split only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from deploylm.errors import UsageError
from deploylm.training.numbers import MAX_NUMBER, number_to_words


@dataclass(frozen=True)
class Example:
    source: str
    target: str


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]


@dataclass(frozen=True)
class SplitSizes:
    train: int
    validation: int
    test: int


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    build: Callable[[int, SplitSizes], Splits]   # (seed, sizes) -> splits
    sizes: SplitSizes                             # default sizes


DIGIT_STRATA = ((1000, 9_999), (10_000, 99_999), (100_000, 999_999))   # 4, 5 and 6 digits, inclusive
SHORT_LENGTHS = ((0, 9), (10, 99), (100, 999))        # 1, 2 and 3 digits: all in training, never held out
SHORT_SHARE = 0.03        # each short length is 3% of training (see the module docstring)
POWERS_OF_TEN = (1000, 10_000, 100_000, MAX_NUMBER)   # differ only in their count of zeros
POWER_SHARE = 0.01        # each power of ten is 1% of training (see the module docstring)


def digits2words_splits(seed: int, sizes: SplitSizes) -> Splits:
    """Numbers as digits -> English words; see the module docstring for how splits are drawn."""
    rng = np.random.default_rng(seed)
    pools = [rng.permutation(np.setdiff1d(np.arange(low, high + 1), POWERS_OF_TEN))
             for low, high in DIGIT_STRATA]
    powers = np.repeat(POWERS_OF_TEN[::-1], max(1, round(sizes.train * POWER_SHARE)))
    short = [np.repeat(np.arange(low, high + 1), max(1, round(sizes.train * SHORT_SHARE / (high + 1 - low))))
             for low, high in SHORT_LENGTHS]                                  # 0..9 x600, 10..99 x67, 100..999 x7
    fixed = np.concatenate([powers, *short])[:sizes.train]                   # powers first, then 0..999
    shares = zip(_even_shares(sizes.test, len(pools)), _even_shares(sizes.validation, len(pools)),
                 _even_shares(sizes.train - len(fixed), len(pools)))
    parts: list[list[np.ndarray]] = [[fixed], [], []]                         # train, validation, test
    for pool, (n_test, n_val, n_train), (low, high) in zip(pools, shares, DIGIT_STRATA):
        if n_test + n_val + min(n_train, 1) > len(pool):
            raise UsageError(f"digits2words: {sizes} holds out more than the {len(pool)} numbers "
                             f"{low}..{high}, or leaves none of them for training")
        rest = pool[n_test + n_val:]
        parts[2].append(pool[:n_test])
        parts[1].append(pool[n_test:n_test + n_val])
        parts[0].append(np.resize(rest, n_train))          # repeats `rest` if the stratum is too small
    test, validation, train = (rng.permutation(np.concatenate(part)) for part in parts[::-1])
    return Splits(*(_number_examples(part) for part in (train, validation, test)))


def _even_shares(total: int, parts: int) -> list[int]:
    """`total` split into `parts` counts that differ by at most one (the first ones get the extra)."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def _number_examples(numbers: np.ndarray) -> list[Example]:
    return [Example(str(int(n)), number_to_words(int(n))) for n in numbers]


REVERSE_WORDS = ("red green blue black white gold fox cat dog owl bee ant "
                 "sun moon star rain snow wind one two three four five six").split()


def reverse_splits(seed: int, sizes: SplitSizes) -> Splits:
    """Sequences of 3..8 words -> the same words in reverse order; sources unique across splits.

    Test is drawn first, then validation, then train, so the held-out splits do not depend on the
    training size."""
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    parts = []
    for size in (sizes.test, sizes.validation, sizes.train):
        part: list[Example] = []
        while len(part) < size:
            draws = size - len(part) + 16
            lengths = rng.integers(3, 9, size=draws)
            rows = rng.integers(0, len(REVERSE_WORDS), size=(draws, 8))
            for length, row in zip(lengths.tolist(), rows.tolist()):
                words = [REVERSE_WORDS[i] for i in row[:length]]
                source = " ".join(words)
                if source not in seen and len(part) < size:
                    seen.add(source)
                    part.append(Example(source, " ".join(reversed(words))))
        parts.append(part)
    test, validation, train = parts
    return Splits(train, validation, test)


TASKS: dict[str, Task] = {
    "digits2words": Task("digits2words", "numbers 0..10^6 as digits -> English words",
                         digits2words_splits, SplitSizes(train=200_000, validation=500, test=1000)),
    "reverse": Task("reverse", "a sequence of 3..8 words -> the same words reversed",
                    reverse_splits, SplitSizes(train=50_000, validation=500, test=1000)),
}


def get_task(name: str) -> Task:
    """The registered task called `name`; UsageError listing the known tasks otherwise."""
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}: expected one of {', '.join(TASKS)}")
    return TASKS[name]


def task_splits(name: str, seed: int, sizes: SplitSizes | None = None) -> Splits:
    """The splits of task `name` drawn from `seed` (default sizes unless given)."""
    task = get_task(name)
    return task.build(seed, sizes or task.sizes)
