"""Built-in tasks: number words, determinism, disjoint splits, the registry."""
import pytest

from deploylm.errors import UsageError
from deploylm.training.numbers import number_to_words
from deploylm.training.tasks import TASKS, SplitSizes, get_task, task_splits

SMALL = SplitSizes(train=3000, validation=200, test=300)


@pytest.mark.parametrize("n, words", [
    (0, "zero"), (7, "seven"), (10, "ten"), (15, "fifteen"), (20, "twenty"), (21, "twenty-one"),
    (99, "ninety-nine"), (100, "one hundred"), (101, "one hundred one"), (110, "one hundred ten"),
    (999, "nine hundred ninety-nine"), (1000, "one thousand"), (1001, "one thousand one"),
    (1100, "one thousand one hundred"), (4096, "four thousand ninety-six"),
    (20_000, "twenty thousand"), (100_000, "one hundred thousand"),
    (999_999, "nine hundred ninety-nine thousand nine hundred ninety-nine"), (10**6, "one million"),
])
def test_number_to_words(n, words):
    assert number_to_words(n) == words


@pytest.mark.parametrize("bad", [-1, 10**6 + 1, 1.5, True])
def test_number_to_words_rejects_out_of_range(bad):
    with pytest.raises(ValueError):
        number_to_words(bad)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_tasks_are_deterministic_and_splits_disjoint(name):
    first, again, other = (task_splits(name, seed, SMALL) for seed in (0, 0, 1))
    assert first == again
    assert first.train != other.train
    assert (len(first.train), len(first.validation), len(first.test)) == (3000, 200, 300)
    sources = [{ex.source for ex in part} for part in (first.train, first.validation, first.test)]
    assert not sources[0] & sources[1] and not sources[0] & sources[2] and not sources[1] & sources[2]
    assert all(ex.source and ex.target for part in (first.train, first.validation, first.test) for ex in part)


def test_digits2words_examples_are_correct_and_cover_small_numbers():
    splits = task_splits("digits2words", 0, SMALL)
    for ex in splits.train[:500] + splits.test:
        assert ex.target == number_to_words(int(ex.source))
    assert {str(n) for n in range(1000)} <= {ex.source for ex in splits.train}
    assert all(1000 <= int(ex.source) <= 10**6 for ex in splits.validation + splits.test)


def test_reverse_targets_are_reversed_sources():
    splits = task_splits("reverse", 3, SMALL)
    for ex in splits.train[:200] + splits.test:
        assert ex.target.split() == ex.source.split()[::-1]
        assert 3 <= len(ex.source.split()) <= 8


def test_unknown_task_lists_known_ones():
    with pytest.raises(UsageError, match="unknown task 'nope': expected one of digits2words, reverse"):
        get_task("nope")
