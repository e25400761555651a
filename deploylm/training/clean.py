"""Data cleaning for `--data`: Unicode NFKC normalisation, whitespace collapse, exact deduplication
(after normalisation), length filtering, and a summary of what was dropped and why.

Records are tuples of texts: (source, target) pairs for seq2seq data, (text,) for language-model
text. A record is judged field by field (every field must be within the length limits) and
deduplicated as a whole (the first occurrence is kept, so the order of the file is preserved).
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Sequence

from deploylm.errors import UsageError

LENGTH_UNITS = ("chars", "words")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class CleanOptions:
    """What `clean_records` does. `enabled=False` (--no-clean) keeps every record exactly as read."""

    enabled: bool = True
    min_length: int = 1               # in `unit`; each field of a record must have at least this many
    max_length: int | None = None     # in `unit`; None: no upper limit
    unit: str = "chars"               # "chars" | "words" (whitespace-separated, after normalisation)

    def __post_init__(self) -> None:
        if self.unit not in LENGTH_UNITS:
            raise UsageError(f"--length-unit {self.unit!r}: expected one of {', '.join(LENGTH_UNITS)}")
        if isinstance(self.min_length, bool) or not isinstance(self.min_length, int) or self.min_length < 0:
            raise UsageError(f"--min-length {self.min_length!r}: expected an integer >= 0")
        if self.max_length is not None and (isinstance(self.max_length, bool) or not isinstance(self.max_length, int)
                                            or self.max_length < max(1, self.min_length)):
            raise UsageError(f"--max-length {self.max_length!r}: expected an integer >= --min-length ({self.min_length}) and >= 1")

    def as_json(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "min_length": self.min_length, "max_length": self.max_length, "unit": self.unit}


@dataclass(frozen=True)
class CleanReport:
    """How many records came in, how many were kept, what normalisation changed, what was dropped."""

    options: CleanOptions
    records_in: int
    kept: int
    normalized: int                                       # kept records that normalisation changed
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few dropped texts

    def as_json(self) -> dict[str, Any]:
        return {"options": self.options.as_json(), "records_in": self.records_in, "kept": self.kept,
                "normalized": self.normalized, "dropped": dict(self.dropped), "examples": dict(self.examples)}

    def summary(self) -> str:
        """One line for the terminal, e.g. `cleaning: 120 records in, 100 kept; dropped 15 duplicate, ...`."""
        if not self.options.enabled:
            return f"cleaning: off (--no-clean): {self.records_in} records used as read"
        dropped = ", ".join(f"{count} {_REASONS[reason](self.options)}" for reason, count in self.dropped.items() if count)
        return (f"cleaning: {self.records_in} records in, {self.kept} kept; dropped {dropped or 'none'}; "
                f"{self.normalized} changed by NFKC/whitespace normalisation")


_REASONS = {
    "empty": lambda o: "empty after normalisation",
    "too_short": lambda o: f"shorter than {o.min_length} {o.unit}",
    "too_long": lambda o: f"longer than {o.max_length} {o.unit}",
    "duplicate": lambda o: "exact duplicates",
}
SHOWN_PER_REASON = 3


def normalize_text(text: str) -> str:
    """NFKC, then every run of whitespace (newlines and tabs included) -> one space, ends stripped."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text)).strip()


def clean_records(records: Sequence[tuple[str, ...]], options: CleanOptions) -> tuple[list[tuple[str, ...]], CleanReport]:
    """The records that survive cleaning (normalised, in input order) and the report."""
    if not options.enabled:
        return list(records), CleanReport(options, len(records), len(records), 0)
    kept: list[tuple[str, ...]] = []
    seen: set[tuple[str, ...]] = set()
    dropped = {reason: 0 for reason in _REASONS}
    examples: dict[str, list[str]] = {}
    normalized = 0
    for record in records:
        clean = tuple(normalize_text(text) for text in record)
        reason = _verdict(clean, options) or ("duplicate" if clean in seen else None)
        if reason is not None:
            dropped[reason] += 1
            shown = examples.setdefault(reason, [])
            if len(shown) < SHOWN_PER_REASON:
                shown.append(" | ".join(text[:80] for text in record))
            continue
        seen.add(clean)
        kept.append(clean)
        normalized += clean != tuple(record)
    return kept, CleanReport(options, len(records), len(kept), normalized, dropped, examples)


def _verdict(record: tuple[str, ...], options: CleanOptions) -> str | None:
    """Why `record` (normalised) is dropped by the length rules, or None to keep it."""
    lengths = [len(text.split()) if options.unit == "words" else len(text) for text in record]
    if min(lengths) == 0:
        return "empty"
    if min(lengths) < options.min_length:
        return "too_short"
    if options.max_length is not None and max(lengths) > options.max_length:
        return "too_long"
    return None
