"""Plain-text data for the decoder-only LM (`--arch decoder`): documents, splits, token stream, windows.

A document is a paragraph of a .txt file (paragraphs are separated by blank lines) or the "text" of
one line of a .jsonl file. Documents are split into train/validation/test like pairs are (by
distinct text, seeded), then each split becomes one token stream `<s> doc </s> <s> doc </s> ...`.
Training sequences are windows of `block_size + 1` tokens starting every `stride` tokens (the
model reads the first block_size tokens and predicts the last block_size).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tokenizers import Tokenizer

from deploylm.errors import UsageError
from deploylm.training.clean import CleanOptions, CleanReport, clean_records
from deploylm.training.data import check_unicode, json_lines, not_utf8, split_keys
from deploylm.training.tokenizer import encode_targets

_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")


@dataclass(frozen=True)
class TextSplits:
    train: list[str]
    validation: list[str]
    test: list[str]


def read_documents(path: Path) -> list[str]:
    """Paragraphs of a text file, or the "text" values of a .jsonl file; blank ones skipped."""
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise UsageError(f"data file {str(path)!r} {what}: expected a text file (paragraphs separated by blank lines) "
                         "or a .jsonl file of {\"text\": ...} lines")
    try:
        content = path.read_text(encoding="utf-8-sig")      # a byte-order mark is no text
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc) from None
    docs = _jsonl_texts(path, content) if path.suffix.lower() == ".jsonl" else _paragraphs(content)
    if not docs:
        raise UsageError(f"{path}: no text: expected paragraphs separated by blank lines")
    return docs


def _paragraphs(content: str) -> list[str]:
    return [p.strip("\n") for p in _PARAGRAPH_BREAK.split(content.replace("\r\n", "\n")) if p.strip()]


def _jsonl_texts(path: Path, content: str) -> list[str]:
    docs = []
    for number, line in enumerate(json_lines(content), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{number}: not valid JSON ({exc.msg}): expected {{\"text\": ...}}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UsageError(f"{path}:{number}: expected a JSON object with a string \"text\" (the decoder-only LM "
                             "trains on text; source/target pairs train --arch seq2seq)")
        check_unicode(f"{path}:{number}", "text", record["text"])
        if record["text"].strip():
            docs.append(record["text"])
    return docs


def load_text(path: Path, clean: CleanOptions) -> tuple[list[str], CleanReport]:
    """The documents of `path` after cleaning, and the cleaning report."""
    records, report = clean_records([(doc,) for doc in read_documents(path)], clean)
    return [text for (text,) in records], report


def text_splits(path: Path | str, docs: list[str], seed: int) -> TextSplits:
    """`docs` split by distinct text (10% test, 5% validation, the rest train), in document order."""
    split_of = split_keys(Path(path), docs, seed, "distinct paragraphs")
    parts: list[list[str]] = [[], [], []]
    for doc in docs:
        parts[split_of[doc]].append(doc)
    return TextSplits(*parts)


def token_stream(tok: Tokenizer, docs: list[str], bos: int, eos: int) -> list[int]:
    """`<s> doc </s>` for every document, concatenated."""
    stream: list[int] = []
    for ids in encode_targets(tok, docs):
        stream += [bos, *ids, eos]
    return stream


def window_starts(stream_len: int, block_size: int, stride: int, what: str) -> list[int]:
    """Start offsets of the windows of block_size + 1 tokens, every `stride` tokens."""
    if stream_len < block_size + 1:
        raise UsageError(f"{what} has {stream_len} tokens: expected at least --block-size + 1 = {block_size + 1}; "
                         "give more text or a smaller --block-size")
    return list(range(0, stream_len - block_size, stride))


@dataclass(frozen=True)
class LMBatch:
    """input_ids [B, T] and labels [B, T] (the next token of each position; -100 is ignored)."""

    input_ids: Tensor
    labels: Tensor

    @property
    def n_tokens(self) -> int:
        return int((self.labels != -100).sum())

    def to(self, device: torch.device) -> "LMBatch":
        return LMBatch(self.input_ids.to(device, non_blocking=True), self.labels.to(device, non_blocking=True))


def make_lm_batch(stream: np.ndarray, starts: list[int], block_size: int) -> LMBatch:
    """The windows of `stream` at `starts` as inputs and next-token labels, each [B, block_size]."""
    rows = torch.from_numpy(np.stack([stream[s:s + block_size + 1] for s in starts]))   # [B, T + 1]
    return LMBatch(rows[:, :-1].contiguous(), rows[:, 1:].contiguous())
