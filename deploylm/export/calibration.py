"""Text for calibration and for the quality report, and the graph feeds made from it.

Where the text comes from:
- `--calibration FILE`: its non-empty lines (paragraphs of a plain text file work too);
- a deploylm checkpoint: its training task (metrics.json names it): sources + targets of the
  training split for calibration, the test split for the held-out quality report;
- anything else (Hugging Face, GGUF): a built-in English passage (calibration) and a different
  built-in passage and prompts (held out).
`graph_feeds` turns token sequences into input dicts for each ONNX graph of a folder (prefill:
empty past), used by static quantization and the fallback search.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deploylm.errors import UsageError

CALIBRATION_TEXT = (
    "The river ran along the edge of the town, slow and brown after the spring rains.",
    "Every morning the baker opened his shop at six and sold bread to the workers on their way to the mill.",
    "Scientists measured the temperature of the lake each week and found that it had risen by two degrees.",
    "She wrote a letter to her brother explaining why she had decided to move to the city.",
    "The committee agreed that the new library should be built near the school and the park.",
    "To install the program, download the archive, unpack it and run the setup script as an administrator.",
    "In the evening the children played football in the street until their parents called them home.",
    "The report shows that sales grew quickly in the first quarter but slowed down during the summer.",
    "Translate English to French: the weather is nice today and the garden is full of flowers.",
    "Question: how many legs does a spider have? Answer: a spider has eight legs.",
    "def mean(values):\n    return sum(values) / len(values)",
    "The old castle on the hill was restored last year and is now open to visitors every weekend.",
)
HELD_OUT_TEXT = (
    "A small boat crossed the harbour in the early light, carrying fish and letters to the island.",
    "The museum keeps a collection of old maps that show how the coastline has changed over the centuries.",
    "When the train was late again, the passengers waited on the platform and talked about the weather.",
    "Good software is tested carefully, documented clearly and changed in small steps that are easy to review.",
    "The farmer planted wheat in the north field and potatoes near the river, where the soil is richer.",
    "After the concert the musicians packed their instruments and drove through the night to the next city.",
)
HELD_OUT_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The best way to learn a language is",
    "Write a short note to a friend:",
)


@dataclass(frozen=True)
class TextSet:
    """Calibration or held-out material: inputs (prompts / sources) and, for seq2seq, targets."""

    inputs: tuple[str, ...]
    targets: tuple[str, ...] | None   # seq2seq only: what each input should produce
    origin: str                       # "file:PATH" | "task:NAME" | "builtin"


def check_calibration_file(path: str | Path | None) -> Path | None:
    """A readable, non-empty UTF-8 text file, or UsageError naming --calibration."""
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--calibration {str(path)!r} does not exist: expected a UTF-8 text file, one sample a line")
    if not read_lines(file):
        raise UsageError(f"--calibration {str(path)!r} has no text: expected one sample a line")
    return file


def read_lines(file: Path) -> list[str]:
    try:
        text = Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--calibration {str(file)!r}: cannot read it ({exc}): expected a UTF-8 text file") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _task_of(folder: Path) -> str | None:
    """The built-in task a checkpoint learned: its training run's metrics.json, or a distilled
    student's distill.json."""
    for record in ("metrics.json", "distill.json"):
        try:
            task = json.loads((Path(folder) / record).read_text()).get("task")
        except (OSError, ValueError, AttributeError):
            continue
        if task:
            return task
    return None


def _task_sets(task: str, samples: int) -> tuple[TextSet, TextSet]:
    from deploylm.training.tasks import SplitSizes, task_splits

    splits = task_splits(task, 0, SplitSizes(train=max(samples, 1000), validation=16, test=16))
    rng = np.random.default_rng(0)
    train = [splits.train[i] for i in rng.permutation(len(splits.train))[:samples]]
    calib = TextSet(tuple(e.source for e in train), tuple(e.target for e in train), f"task:{task}")
    held = TextSet(tuple(e.source for e in splits.test), tuple(e.target for e in splits.test), f"task:{task}")
    return calib, held


def text_sets(source: Any, file: Path | None, samples: int, seq2seq: bool) -> tuple[TextSet, TextSet]:
    """(calibration, held-out) for `source` (a deploylm.models.source.Source)."""
    task = _task_of(source.path) if source.kind == "checkpoint" else None
    if task is not None and file is None:
        return _task_sets(task, samples)
    if task is not None:
        _, held = _task_sets(task, samples)
    else:
        held = TextSet(HELD_OUT_PROMPTS if not seq2seq else HELD_OUT_TEXT[:4],
                       HELD_OUT_TEXT[:4] if seq2seq else None, "builtin")
    if file is not None:
        lines = tuple(read_lines(file)[:samples])
        return TextSet(lines, lines if seq2seq else None, f"file:{file}"), held
    texts = tuple((CALIBRATION_TEXT * (1 + samples // len(CALIBRATION_TEXT)))[:max(samples, 1)])
    return TextSet(texts, texts if seq2seq else None, "builtin"), held


def perplexity_texts(held: TextSet) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    """(inputs, targets) scored by the quality report: decoder-only scores HELD_OUT_TEXT itself."""
    if held.targets is not None:
        return held.inputs, held.targets
    return HELD_OUT_TEXT, None


def token_ids(tokenizer: Any, texts: tuple[str, ...], max_len: int = 64) -> list[list[int]]:
    """Tokenize without padding, truncated to max_len; empty results dropped."""
    out = [list(tokenizer(t)["input_ids"])[:max_len] for t in texts]
    return [ids for ids in out if ids]


def graph_feeds(folder: Path, sequences: list[list[int]], targets: list[list[int]] | None = None,
                rows: int = 4) -> dict[str, list[dict[str, np.ndarray]]]:
    """Feeds for every graph in `folder`, `rows` sequences per batch (left-padded).

    model.onnx: per batch, a prefill (ids/mask/positions + empty past) and one decode step after it.
    encoder_model.onnx: ids/mask (right-padded).
    decoder_model.onnx: start token + the target (default: the sequence itself) as decoder input,
    cross K/V from the encoder graph in `folder`.
    """
    import onnxruntime as ort

    from deploylm.export import io_spec

    folder = Path(folder)
    batches = [sequences[i:i + rows] for i in range(0, len(sequences), rows)]
    if (folder / io_spec.MODEL_FILE).is_file():
        session = ort.InferenceSession(str(folder / io_spec.MODEL_FILE), providers=["CPUExecutionProvider"])
        feeds = []
        for b in batches:
            prefill = _causal_feeds(session, b)
            feeds += [prefill, _causal_step_feeds(session, prefill)]
        return {io_spec.MODEL_FILE: feeds}
    enc = ort.InferenceSession(str(folder / io_spec.ENCODER_FILE), providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(folder / io_spec.DECODER_FILE), providers=["CPUExecutionProvider"])
    enc_feeds = [_pad(b, left=False) for b in batches]
    targets = targets if targets is not None else sequences
    dec_batches = [targets[i:i + rows] for i in range(0, len(targets), rows)]
    dec_feeds = [_decoder_feeds(enc, dec, f, b) for f, b in zip(enc_feeds, dec_batches)]
    return {io_spec.ENCODER_FILE: enc_feeds, io_spec.DECODER_FILE: dec_feeds}


def _pad(batch: list[list[int]], left: bool, pad: int = 0) -> dict[str, np.ndarray]:
    width = max(len(s) for s in batch)
    ids = np.full((len(batch), width), pad, dtype=np.int64)
    mask = np.zeros((len(batch), width), dtype=np.int64)
    for r, seq in enumerate(batch):
        sl = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[r, sl], mask[r, sl] = seq, 1
    return {"input_ids": ids, "attention_mask": mask}


def _empty_past(session: Any, rows: int, part: str = "") -> dict[str, np.ndarray]:
    feeds = {}
    for arg in session.get_inputs():
        if arg.name.startswith("past_key_values.") and (not part or f".{part}." in arg.name):
            feeds[arg.name] = np.zeros((rows, int(arg.shape[1]), 0, int(arg.shape[3])), dtype=np.float32)
    return feeds


def _causal_feeds(session: Any, batch: list[list[int]]) -> dict[str, np.ndarray]:
    feeds = _pad(batch, left=True)
    positions = np.clip(feeds["attention_mask"].cumsum(-1) - 1, 0, None)  # [B, T]
    return {**feeds, "position_ids": positions.astype(np.int64), **_empty_past(session, len(batch))}


def _causal_step_feeds(session: Any, prefill: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One decode step after `prefill`: the model's own next token, with the prefill's K/V as the past.

    Calibrating on prefills alone never exercises attention to a past (empty there); the append-layout
    graph computes the past's scores in a branch of its own, which static quantization would then see
    only with empty tensors. Works for both layouts: `present.*` (past + new) and `new_key_values.*`
    (the new positions, here all of the prefill) both become `past_key_values.*`.
    """
    names = [o.name for o in session.get_outputs()]
    outs = dict(zip(names, session.run(None, prefill)))
    past = {n.replace("present.", "past_key_values.").replace("new_key_values.", "past_key_values."): v
            for n, v in outs.items() if n.startswith(("present.", "new_key_values."))}
    mask = prefill["attention_mask"]
    rows = mask.shape[0]
    next_ids = outs["logits"][:, -1, :].argmax(-1).astype(np.int64).reshape(rows, 1)      # [B, 1]
    return {"input_ids": next_ids, "attention_mask": np.concatenate([mask, np.ones((rows, 1), np.int64)], axis=1),
            "position_ids": (prefill["position_ids"][:, -1:] + 1).astype(np.int64), **past}


def _decoder_feeds(enc: Any, dec: Any, enc_feeds: dict[str, np.ndarray], batch: list[list[int]]) -> dict[str, np.ndarray]:
    names = [o.name for o in enc.get_outputs()]
    outs = dict(zip(names, enc.run(None, enc_feeds)))
    cross = {n.replace("present.", "past_key_values."): v for n, v in outs.items() if n.startswith("present.")}
    ids = _pad([[0] + s for s in batch], left=False)["input_ids"]  # [B, 1 + T]: start token, then the text
    return {"input_ids": ids, "encoder_attention_mask": enc_feeds["attention_mask"],
            **_empty_past(dec, len(batch), "decoder"), **cross}
