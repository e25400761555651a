"""Built-in seq2seq tasks: deterministic from a seed, with disjoint train/validation/test splits.

- digits2words: "4096" -> "four thousand ninety-six" for numbers 0..10^6 (convention in numbers.py).
  Every number below 1000 is in the training split (they are the task's vocabulary); validation and
  test are drawn without replacement from 1000..10^6, and the rest of the training split from the
  numbers left over, so no number is in two splits.
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


def digits2words_splits(seed: int, sizes: SplitSizes) -> Splits:
    """Numbers as digits -> English words; see the module docstring for how splits are drawn."""
    rng = np.random.default_rng(seed)
    pool = rng.permutation(np.arange(1000, MAX_NUMBER + 1))
    held_out = sizes.validation + sizes.test
    n_rest = max(0, sizes.train - 1000)
    if held_out + n_rest > len(pool):
        raise UsageError(f"digits2words: {sizes} asks for more numbers than 0..{MAX_NUMBER} holds")
    test = pool[:sizes.test]
    validation = pool[sizes.test:held_out]
    train = np.concatenate([np.arange(min(1000, sizes.train)), pool[held_out:held_out + n_rest]])
    train = rng.permutation(train)
    return Splits(*(_number_examples(part) for part in (train, validation, test)))


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
