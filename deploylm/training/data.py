"""Training data: `--data FILE.jsonl` loading and splitting, and deterministic padded batches.

The batch for a given step is a pure function of (seed, step): epoch e visits the training split in
the order of a permutation drawn from seed + e. So the data position is the step count itself, and
a resumed run sees exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tokenizers import Tokenizer

from deploylm.errors import UsageError
from deploylm.training.clean import CleanOptions, CleanReport, clean_records
from deploylm.training.tasks import Example, Splits
from deploylm.training.tokenizer import encode_sources, encode_targets

VALIDATION_FRACTION = 0.05
TEST_FRACTION = 0.10
MAX_HELD_OUT = 1000          # cap on each of validation/test for large files


def not_utf8(path: Path, exc: UnicodeDecodeError) -> UsageError:
    """A data file that is not UTF-8, named FILE:LINE as the other data errors are, with the byte."""
    line = exc.object[:exc.start].count(b"\n") + 1
    return UsageError(f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start}): expected a UTF-8 file "
                      "(convert it, e.g. iconv -f latin1 -t utf-8)")


def read_jsonl(path: Path) -> list[Example]:
    """Examples of a JSON-lines file of {"source": str, "target": str}; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise UsageError(f"data file {str(path)!r} {what}: expected a .jsonl file of {{\"source\", \"target\"}} lines")
    try:
        lines = json_lines(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc) from None
    examples = [_parse_line(path, number, line) for number, line in enumerate(lines, 1) if line.strip()]
    if not examples:
        raise UsageError(f"{path}: no examples: expected one {{\"source\": ..., \"target\": ...}} object per line")
    return examples


def json_lines(content: str) -> list[str]:
    """The lines of a JSON-lines file: split at "\n" only. str.splitlines also splits at U+2028, U+0085
    and other characters that JSON strings may hold raw (json.dumps(..., ensure_ascii=False))."""
    return [line.removesuffix("\r") for line in content.split("\n")]


def _parse_line(path: Path, number: int, line: str) -> Example:
    where = f"{path}:{number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{where}: not valid JSON ({exc.msg}): expected {{\"source\": ..., \"target\": ...}}") from None
    if not isinstance(record, dict):
        raise UsageError(f"{where}: expected a JSON object with \"source\" and \"target\", got {type(record).__name__}")
    for key in ("source", "target"):
        if key not in record:
            raise UsageError(f"{where}: missing key {key!r}: expected {{\"source\": ..., \"target\": ...}}")
        value = record[key]
        if not isinstance(value, str):
            raise UsageError(f"{where}: {key!r} is {type(value).__name__}: expected a string")
        if not value.strip():
            raise UsageError(f"{where}: {key!r} is empty: expected non-empty text")
        check_unicode(where, key, value)
    return Example(record["source"], record["target"])


def check_unicode(where: str, key: str, value: str) -> None:
    """UsageError naming `where` when a JSON string holds a lone surrogate (an escape such as "\\ud83d"
    without its pair): it is no Unicode text, and the tokenizer would fail on it mid-run."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UsageError(f"{where}: {key!r} holds a lone surrogate ({value[exc.start]!r} at character {exc.start}): "
                         "expected valid Unicode text") from None


def jsonl_splits(path: Path, seed: int, clean: CleanOptions | None = None) -> Splits:
    """Examples of `path` (cleaned with `clean`; None: as read) split by source text, shuffled by `seed`."""
    examples, _ = load_pairs(path, clean or CleanOptions(enabled=False))
    return pair_splits(path, examples, seed)


def load_pairs(path: Path, clean: CleanOptions) -> tuple[list[Example], CleanReport]:
    """The examples of a .jsonl file after cleaning, and the cleaning report."""
    records, report = clean_records([(ex.source, ex.target) for ex in read_jsonl(path)], clean)
    return [Example(source, target) for source, target in records], report


def pair_splits(path: Path, examples: list[Example], seed: int) -> Splits:
    """`examples` split by source text (one source never in two splits), shuffled by `seed`."""
    split_of = split_keys(path, [ex.source for ex in examples], seed, "distinct sources")
    parts: list[list[Example]] = [[], [], []]
    for ex in examples:
        parts[split_of[ex.source]].append(ex)
    return Splits(*parts)


def split_keys(path: Path, keys: list[str], seed: int, what: str) -> dict[str, int]:
    """Each distinct key -> 0 (train), 1 (validation) or 2 (test): 10% test and 5% validation (each
    at least 1, at most MAX_HELD_OUT) of the distinct keys, drawn by `seed`."""
    distinct = sorted(set(keys))
    if len(distinct) < 3:
        raise UsageError(f"{path}: {len(distinct)} {what} (after cleaning): expected at least 3 (train, validation, test)")
    order = np.random.default_rng(seed).permutation(len(distinct))
    n_test = min(MAX_HELD_OUT, max(1, round(TEST_FRACTION * len(distinct))))
    n_val = min(MAX_HELD_OUT, max(1, round(VALIDATION_FRACTION * len(distinct))))
    return {distinct[index]: 2 if rank < n_test else 1 if rank < n_test + n_val else 0
            for rank, index in enumerate(order)}


@dataclass(frozen=True)
class Batch:
    """One padded batch. src_ids/src_mask: [B, S]; tgt_in (<s> + target) and labels (target + </s>,
    pad -> -100): [B, T]."""

    src_ids: Tensor
    src_mask: Tensor
    tgt_in: Tensor
    labels: Tensor

    @property
    def n_tokens(self) -> int:
        """Real (non-pad) source + target tokens."""
        return int(self.src_mask.sum()) + int((self.labels != -100).sum())

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in (self.src_ids, self.src_mask, self.tgt_in, self.labels)))


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    bos: int       # decoder start
    eos: int


def make_batch(tok: Tokenizer, examples: list[Example], ids: SpecialIds, max_len: int) -> Batch:
    """Tokenize and pad `examples`; sources and targets cut to `max_len` tokens."""
    src = [s[:max_len - 1] + s[-1:] if len(s) > max_len else s
           for s in encode_sources(tok, [ex.source for ex in examples])]
    tgt = [t[:max_len - 1] for t in encode_targets(tok, [ex.target for ex in examples])]
    src_ids = _pad(src, ids.pad)                                          # [B, S]
    tgt_in = _pad([[ids.bos] + t for t in tgt], ids.pad)                  # [B, T]
    labels = _pad([t + [ids.eos] for t in tgt], -100)                     # [B, T]
    return Batch(src_ids, (src_ids != ids.pad).long(), tgt_in, labels)


def _pad(rows: list[list[int]], value: int) -> Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


class BatchStream:
    """Training batches as a pure function of the step: `batch(step)` is the same in every run."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int):
        if not examples:
            raise UsageError("the training split is empty: expected at least one example")
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def position(self, step: int) -> dict[str, int]:
        """Where `step`'s batch starts: epoch and offset in that epoch's order."""
        start = step * self.batch_size
        return {"epoch": start // len(self.examples), "offset": start % len(self.examples)}

    def examples_at(self, step: int) -> list[Example]:
        """The `batch_size` examples of `step` (wrapping into the next epoch's order when needed)."""
        start = step * self.batch_size
        return [self.examples[self._index(i)] for i in range(start, start + self.batch_size)]

    def _index(self, i: int) -> int:
        epoch, offset = divmod(i, len(self.examples))
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        return int(self._order[offset])
