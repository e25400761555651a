"""English words for whole numbers 0..10^6, in one fixed convention.

Convention (American, as written in cheques without "and"):
- no "and" ("one hundred one"), no commas, words separated by single spaces;
- tens and units joined by a hyphen ("twenty-one", "ninety-nine");
- hundreds, thousands and the million always carry their count ("one hundred", "one thousand",
  "one million"), never "a hundred" or "eleven hundred" (1100 is "one thousand one hundred");
- zero is "zero" and appears only alone.
"""
from __future__ import annotations

UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
MAX_NUMBER = 1_000_000


def number_to_words(n: int) -> str:
    """`4096` -> "four thousand ninety-six"; defined for 0 <= n <= 10^6."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_NUMBER:
        raise ValueError(f"number {n!r}: expected an integer in 0..{MAX_NUMBER}")
    if n == 0:
        return "zero"
    if n == MAX_NUMBER:
        return "one million"
    thousands, rest = divmod(n, 1000)
    parts = []
    if thousands:
        parts.append(f"{_below_1000(thousands)} thousand")
    if rest:
        parts.append(_below_1000(rest))
    return " ".join(parts)


def _below_1000(n: int) -> str:
    """1..999 in words."""
    hundreds, rest = divmod(n, 100)
    parts = [f"{UNITS[hundreds]} hundred"] if hundreds else []
    if rest:
        parts.append(_below_100(rest))
    return " ".join(parts)


def _below_100(n: int) -> str:
    """1..99 in words, tens and units hyphenated."""
    if n < 20:
        return UNITS[n]
    tens, units = divmod(n, 10)
    return TENS[tens] + (f"-{UNITS[units]}" if units else "")
