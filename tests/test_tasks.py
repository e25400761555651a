"""Built-in tasks: number words, determinism, disjoint splits, the registry."""
from collections import Counter

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


@pytest.mark.parametrize("seed", [0, 5])
def test_digits2words_splits_are_stratified_by_digit_length(seed):
    sizes = SplitSizes(train=6000, validation=300, test=600)
    splits = task_splits("digits2words", seed, sizes)
    for name, part, tolerance in (("test", splits.test, 0), ("validation", splits.validation, 0),
                                  ("train", splits.train, 1)):
        counts = Counter(len(ex.source) for ex in part)
        large = [counts[4], counts[5], counts[6]]
        assert max(large) - min(large) <= tolerance, (name, counts)
        if name != "train":
            assert set(counts) == {4, 5, 6} and sum(large) == len(part), (name, counts)
    counts = Counter(ex.source for ex in splits.train)
    assert [counts[str(10**k)] for k in range(3, 7)] == [60] * 4     # each power of ten: 1% of training
    assert not {str(10**k) for k in range(3, 7)} & {ex.source for ex in splits.validation + splits.test}
    assert len({ex.source for ex in splits.train if len(ex.source) <= 3}) == 1000


def test_digits2words_held_out_splits_do_not_depend_on_training_size():
    small, large = (task_splits("digits2words", 2, SplitSizes(train, 100, 150)) for train in (2000, 30_000))
    assert (small.validation, small.test) == (large.validation, large.test)
    assert "1000000" in {ex.source for ex in small.train}


def test_digits2words_default_splits_give_short_numbers_3_percent_per_length_and_long_ones_the_rest():
    splits = task_splits("digits2words", 0)
    lengths = Counter(len(ex.source) for ex in splits.train if ex.source not in {str(10**k) for k in range(3, 7)})
    for digits in (1, 2, 3):       # 0..999 are all in training, each length repeated to 3% of it
        assert abs(lengths[digits] / len(splits.train) - 0.03) < 0.002, lengths   # whole repeats
    rest = (len(splits.train) - lengths[1] - lengths[2] - lengths[3] - 4 * 2000) / 3
    assert all(abs(lengths[digits] - rest) <= 1 for digits in (4, 5, 6)), lengths
    four = [ex.source for ex in splits.train if len(ex.source) == 4]
    assert 8000 < len(set(four)) <= 9000 - 167 - 334     # every 4-digit number not held out, repeated
    assert {ex.source for ex in splits.train}.isdisjoint(ex.source for ex in splits.validation + splits.test)
    assert "1000000" in {ex.source for ex in splits.train}


def test_digits2words_rejects_held_out_sizes_larger_than_a_stratum():
    with pytest.raises(UsageError, match="digits2words: .* 1000..9999"):
        task_splits("digits2words", 0, SplitSizes(train=2000, validation=100, test=27_000))


def test_digits2words_refuses_held_out_sizes_that_leave_a_stratum_nothing_to_train_on():
    """Test and validation taking all 8999 four-digit numbers (1000 is among the powers of ten) with training
    still owed some: refused by name, not training rows filled with another number (np.resize of nothing
    gives zeros). One number fewer held out leaves one to repeat."""
    with pytest.raises(UsageError, match="leaves none of them for training"):
        task_splits("digits2words", 0, SplitSizes(train=2000, validation=3 * 8999, test=0))
    train = task_splits("digits2words", 0, SplitSizes(train=2000, validation=3 * 8998, test=0)).train
    four_digits = Counter(e.source for e in train if len(e.source) == 4 and e.source != "1000")
    assert len(four_digits) == 1 and sum(four_digits.values()) == 290     # (2000 - 1130 fixed) / 3


def test_digits2words_trains_on_every_power_of_ten_at_least_once_however_small_the_split():
    """1% of 40 training rows rounds to 0: each power of ten is still there once (module docstring)."""
    train = {e.source for e in task_splits("digits2words", 0, SplitSizes(train=40, validation=3, test=3)).train}
    assert {"1000", "10000", "100000", "1000000"} <= train


def test_reverse_targets_are_reversed_sources():
    splits = task_splits("reverse", 3, SMALL)
    for ex in splits.train[:200] + splits.test:
        assert ex.target.split() == ex.source.split()[::-1]
        assert 3 <= len(ex.source.split()) <= 8
    assert {len(ex.source.split()) for ex in splits.train} == set(range(3, 9))     # 3..8 words, both ends included


def test_unknown_task_lists_known_ones():
    with pytest.raises(UsageError, match="unknown task 'nope': expected one of digits2words, reverse"):
        get_task("nope")
