"""Text for calibration and for the quality report, and the graph feeds made from it.

Where the text comes from:
- `--calibration FILE`: its non-empty lines (paragraphs of a plain text file work too);
- a deploylm checkpoint: what it was trained on (metrics.json, or a student's distill.json, names
  it): a built-in task, or a `--data` file that is still where it was. The training split
  calibrates; the test split is the held-out material of the quality report (seq2seq: sources and
  targets; decoder-only: its documents are scored, their first words are the prompts). A text
  model's splits are drawn with its training seed (recorded in metrics.json; 0 before it was), so
  its held-out documents are the ones it did not train on;
- a Hugging Face student of `deploylm distill`: its --data file (distill.json names it), the last tenth
  of its lines held out, as distill held them out;
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
    origin: str                       # "file:PATH" | "task:NAME" | "data:PATH" | "data-changed:PATH" | "builtin"
    scored: tuple[str, ...] | None = None   # decoder-only held-out documents whose perplexity is scored
    available: int | None = None            # a --calibration file: how many samples it holds (inputs: the first ones)


JSONL_FIELDS = ("source", "prompt", "text")   # a .jsonl calibration file: each line's first of these


def check_calibration_file(path: str | Path | None) -> Path | None:
    """A readable, non-empty UTF-8 text file (or .jsonl of records), or UsageError naming --calibration."""
    if path is None:
        return None
    file = Path(path)
    if file.is_dir():
        raise UsageError(f"--calibration {str(path)!r} is a folder: expected a UTF-8 text file, one sample a line")
    if not file.is_file():
        raise UsageError(f"--calibration {str(path)!r} does not exist: expected a UTF-8 text file, one sample a line")
    if not read_lines(file):
        raise UsageError(f"--calibration {str(path)!r} has no text: expected one sample a line")
    return file


def read_lines(file: Path) -> list[str]:
    """The samples of a calibration file: its non-empty lines; for a .jsonl file (training pairs, say)
    each record's "source", "prompt" or "text"."""
    return [text for text, _ in read_samples(file)]


def pair_targets(samples: list[tuple[str, str | None]]) -> list[str] | None:
    """An encoder-decoder's decoder side of read_samples' samples of a .jsonl file of pairs: each record's
    "target", when every record has one (None otherwise, and for plain text files)."""
    targets = [target for _, target in samples]
    return targets if targets and all(t is not None for t in targets) else None  # type: ignore[return-value]


def read_samples(file: Path) -> list[tuple[str, str | None]]:
    """(sample text, its "target" or None) for every sample of a calibration file (see read_lines)."""
    try:
        text = Path(file).read_text(encoding="utf-8-sig")      # a byte-order mark is no sample text
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--calibration {str(file)!r}: cannot read it ({exc}): expected a UTF-8 text file") from None
    if Path(file).suffix.lower() != ".jsonl":
        return [(line.strip(), None) for line in text.splitlines() if line.strip()]
    from deploylm.training.data import json_lines    # "\n" only: JSON strings may hold U+2028 raw

    samples = []
    for number, line in enumerate((line for line in json_lines(text) if line.strip()), 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        value = next((record[k] for k in JSONL_FIELDS if isinstance(record, dict) and k in record), None)
        if not isinstance(value, str) or not value.strip():
            raise UsageError(f"--calibration {str(file)!r} line {number}: expected a JSON object with a text field "
                             f"({', '.join(JSONL_FIELDS)}), or give a plain text file, one sample a line")
        target = record.get("target") if isinstance(record, dict) else None
        samples.append((value.strip(), target.strip() if isinstance(target, str) and target.strip() else None))
    return samples


HELD_DOCUMENTS = 16      # held-out documents of a text model scored for perplexity
PROMPT_WORDS = 6         # ... and the words of each that make a beam-agreement prompt


def _run_record(folder: Path, records: tuple[str, ...] = ("metrics.json", "distill.json")) -> dict[str, Any]:
    """What a checkpoint was trained on: its training run's metrics.json, or a distilled student's
    distill.json ({} when neither names a task or data file). A --data path that an older run recorded
    as typed (relative to where it ran) is taken from training_state.pt, which holds it absolute."""
    for record in records:
        try:
            found = json.loads((Path(folder) / record).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(found, dict) and (found.get("task") or found.get("data")):
            if found.get("data") and not Path(found["data"]).is_absolute():
                found = {**found, **_training_identity(folder)}
            return found
    return {}


def _training_identity(folder: Path) -> dict[str, Any]:
    from deploylm.models.checkpoint import load_training_state

    try:
        identity = (load_training_state(folder) or {}).get("identity") or {}
    except UsageError:
        return {}
    return {k: identity[k] for k in ("data", "clean", "data_sha256") if identity.get(k) is not None}


def _clean_options(record: dict[str, Any]) -> Any:
    """The cleaning a --data run applied (so its splits are drawn again as they were): `clean`, or an
    older metrics.json's `cleaning.options`; the defaults when neither is there."""
    from deploylm.training.clean import CleanOptions

    options = record.get("clean") or (record.get("cleaning") or {}).get("options")
    try:
        return CleanOptions(**options) if isinstance(options, dict) else CleanOptions()
    except (TypeError, UsageError):
        return CleanOptions()


def _seed(record: dict[str, Any]) -> int:
    seed = record.get("seed", 0)
    return seed if isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0 else 0


def _sample(items: list[Any], samples: int) -> list[Any]:
    """`samples` of `items` in a fixed random order (seed 0), so calibration is the same on every export."""
    order = np.random.default_rng(0).permutation(len(items))[:samples]
    return [items[i] for i in order]


def _pair_sets(splits: Any, samples: int, origin: str) -> tuple[TextSet, TextSet]:
    """Seq2seq splits: training pairs calibrate, test pairs are held out."""
    train = _sample(splits.train, samples)
    calib = TextSet(tuple(e.source for e in train), tuple(e.target for e in train), origin)
    held = TextSet(tuple(e.source for e in splits.test), tuple(e.target for e in splits.test), origin)
    return calib, held


def _document_sets(splits: Any, samples: int, origin: str) -> tuple[TextSet, TextSet]:
    """Text splits of a decoder-only model: training documents calibrate; test documents are scored,
    and their first words are the beam-agreement prompts."""
    train = _sample(splits.train, samples)
    scored = tuple(splits.test[:HELD_DOCUMENTS])
    prompts = tuple(" ".join(doc.split()[:PROMPT_WORDS]) for doc in scored[:len(HELD_OUT_PROMPTS)])
    return TextSet(tuple(train), None, origin), TextSet(prompts, None, origin, scored)


def _task_sets(task: str, samples: int, seed: int = 0) -> tuple[TextSet, TextSet]:
    from deploylm.training.outdir import TEXT_TASKS, text_task_splits

    if task in TEXT_TASKS:
        return _document_sets(text_task_splits(task, seed), samples, f"task:{task}")
    from deploylm.training.tasks import SplitSizes, task_splits

    splits = task_splits(task, seed, SplitSizes(train=max(samples, 1000), validation=16, test=16))
    return _pair_sets(splits, samples, f"task:{task}")


def _data_sets(record: dict[str, Any], samples: int) -> tuple[TextSet, TextSet] | None:
    """The sets of a checkpoint trained on `--data FILE`, when FILE is still there and splits."""
    path = Path(record["data"])
    if not path.is_file():
        return None
    from deploylm.training.config import file_sha256

    clean = _clean_options(record)
    changed = isinstance(record.get("data_sha256"), str) and file_sha256(path) != record["data_sha256"]
    origin = f"{'data-changed' if changed else 'data'}:{path}"
    try:
        if record.get("arch") == "lines":                  # a Hugging Face student: distill's own split of the file
            sets = _line_sets(path, samples, origin)
        elif record.get("arch") == "decoder":
            from deploylm.training.text import load_text, text_splits

            docs, _ = load_text(path, clean)
            sets = _document_sets(text_splits(path, docs, _seed(record)), samples, origin)
        else:
            from deploylm.training.data import load_pairs, pair_splits

            examples, _ = load_pairs(path, clean)
            sets = _pair_sets(pair_splits(path, examples, _seed(record)), samples, origin)
    except UsageError:            # changed since training, too small to split: the built-in text then
        return None
    return sets if sets[1].inputs and sets[0].inputs else None


def _line_sets(path: Path, samples: int, origin: str) -> tuple[TextSet, TextSet]:
    """A Hugging Face student's --data as `deploylm distill` split it: the non-blank lines, the last tenth held
    out (distill holds out the last tenth of the token blocks of the same lines, in order). UsageError when the
    file is unreadable (distill's own refusal) or has too few lines for a held-out tenth."""
    from types import SimpleNamespace

    from deploylm.training.distill_setup import HELD_OUT_FRACTION, read_data_lines

    lines = [line.strip() for line in read_data_lines(path)]
    held = len(lines) // HELD_OUT_FRACTION
    if not held:
        raise UsageError(f"{path}: {len(lines)} line(s), too few to hold out a tenth")
    return _document_sets(SimpleNamespace(train=lines[:-held], test=lines[-held:]), samples, origin)


def text_sets(source: Any, file: Path | None, samples: int, seq2seq: bool) -> tuple[TextSet, TextSet]:
    """(calibration, held-out) for `source` (a deploylm.models.source.Source)."""
    if source.kind == "checkpoint":
        record = _run_record(source.path)
    elif source.kind == "hf":                                # a student `deploylm distill` wrote, if it is one
        record = _run_record(source.path, ("distill.json",))
    else:
        record = {}
    own = None
    if record.get("task"):
        own = _task_sets(record["task"], samples, _seed(record))
    elif record.get("data"):
        own = _data_sets(record, samples)
    if own is not None and file is None:
        return own
    if own is not None:
        held = own[1]
    else:
        held = TextSet(HELD_OUT_PROMPTS if not seq2seq else HELD_OUT_TEXT[:4],
                       HELD_OUT_TEXT[:4] if seq2seq else None, "builtin")
    if file is not None:
        records = read_samples(file)                        # read once: texts, and pairs' targets
        lines = tuple(text for text, _ in records[:samples])
        targets = pair_targets(records) if seq2seq else None   # training pairs: the decoder sees their targets
        return TextSet(lines, (tuple(targets[:samples]) if targets else lines) if seq2seq else None,
                       f"file:{file}", available=len(records)), held
    texts = tuple((CALIBRATION_TEXT * (1 + samples // len(CALIBRATION_TEXT)))[:max(samples, 1)])
    return TextSet(texts, texts if seq2seq else None, "builtin"), held


def describe(origin: str) -> str:
    """Words for where held-out material came from, for the quality line."""
    kind, _, name = origin.partition(":")
    return {"task": f"the test split of task {name}", "data": f"the test split of {name}",
            "data-changed": f"the test split of {name}, which changed since training (its split may hold "
                            "examples the model trained on)",
            "file": f"{name}"}.get(kind, "built-in English text (no training data of this model found)")


def perplexity_texts(held: TextSet) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    """(inputs, targets) scored by the quality report: seq2seq scores the targets; decoder-only its
    held-out documents, else HELD_OUT_TEXT itself."""
    if held.targets is not None:
        return held.inputs, held.targets
    return (held.scored or HELD_OUT_TEXT), None


def token_ids(tokenizer: Any, texts: tuple[str, ...], max_len: int = 64) -> list[list[int]]:
    """Tokenize without padding, truncated to max_len; empty results dropped."""
    out = [list(tokenizer(t)["input_ids"])[:max_len] for t in texts]
    return [ids for ids in out if ids]


def graph_feeds(folder: Path, sequences: list[list[int]], targets: list[list[int]] | None = None,
                rows: int = 4) -> dict[str, list[dict[str, np.ndarray]]]:
    """Feeds for every graph in `folder`, `rows` sequences per batch, padded with the model's pad token.

    model.onnx: per batch, a prefill (ids/mask/positions + empty past) and one decode step after it.
    encoder_model.onnx: ids/mask (right-padded).
    decoder_model.onnx: the model's decoder start token + the target (default: the sequence itself) as decoder input,
    cross K/V from the encoder graph in `folder`.
    """
    import onnxruntime as ort

    from deploylm.backends.onnx_backend import folder_special
    from deploylm.export import io_spec

    folder = Path(folder)
    special = folder_special(folder)[0]
    pad = special.pad_token_id if special.pad_token_id is not None else 0   # as the backend pads at run time
    batches = [sequences[i:i + rows] for i in range(0, len(sequences), rows)]
    if (folder / io_spec.MODEL_FILE).is_file():
        session = ort.InferenceSession(str(folder / io_spec.MODEL_FILE), providers=["CPUExecutionProvider"])
        feeds = []
        for b in batches:
            prefill = _causal_feeds(session, b, pad)
            feeds += [prefill, _causal_step_feeds(session, prefill)]
        return {io_spec.MODEL_FILE: feeds}
    enc = ort.InferenceSession(str(folder / io_spec.ENCODER_FILE), providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(folder / io_spec.DECODER_FILE), providers=["CPUExecutionProvider"])
    enc_feeds = [_pad(b, left=False, pad=pad) for b in batches]
    targets = targets if targets is not None else sequences
    dec_batches = [targets[i:i + rows] for i in range(0, len(targets), rows)]
    dec_feeds = [_decoder_feeds(enc, dec, f, b, special.decoder_start_token_id, pad)
                 for f, b in zip(enc_feeds, dec_batches)]
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
        if arg.name.startswith(("past_key_values.", "prompt_key_values.")) and (not part or f".{part}." in arg.name):
            feeds[arg.name] = np.zeros((rows, int(arg.shape[1]), 0, int(arg.shape[3])), dtype=np.float32)
    return feeds


def _causal_feeds(session: Any, batch: list[list[int]], pad: int = 0) -> dict[str, np.ndarray]:
    feeds = _pad(batch, left=True, pad=pad)
    positions = np.clip(feeds["attention_mask"].cumsum(-1) - 1, 0, None)  # [B, T]
    return {**feeds, "position_ids": positions.astype(np.int64), **_empty_past(session, len(batch))}


def _causal_step_feeds(session: Any, prefill: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One decode step after `prefill`: the model's own next token, with the prefill's K/V as the past.

    Calibrating on prefills alone never exercises attention to a past (empty there); the append-layout
    graph computes the past's scores in a branch of its own, which static quantization would then see
    only with empty tensors. Works for every layout: `present.*` (past + new) and `new_key_values.*`
    (the new positions, here all of the prefill) both become `past_key_values.*`; a shared-prompt graph
    takes the first half of the positions as its `prompt_key_values.*` and the rest as its past, so
    both of its attention branches see real K/V.
    """
    names = [o.name for o in session.get_outputs()]
    outs = dict(zip(names, session.run(None, prefill)))
    past = {n.replace("present.", "past_key_values.").replace("new_key_values.", "past_key_values."): v
            for n, v in outs.items() if n.startswith(("present.", "new_key_values."))}
    if any(arg.name.startswith("prompt_key_values.") for arg in session.get_inputs()):
        split = prefill["attention_mask"].shape[1] // 2
        past = {**{n.replace("past_key_values.", "prompt_key_values."): np.ascontiguousarray(v[:, :, :split])
                   for n, v in past.items()},
                **{n: np.ascontiguousarray(v[:, :, split:]) for n, v in past.items()}}
    mask = prefill["attention_mask"]
    rows = mask.shape[0]
    next_ids = outs["logits"][:, -1, :].argmax(-1).astype(np.int64).reshape(rows, 1)      # [B, 1]
    return {"input_ids": next_ids, "attention_mask": np.concatenate([mask, np.ones((rows, 1), np.int64)], axis=1),
            "position_ids": (prefill["position_ids"][:, -1:] + 1).astype(np.int64), **past}


def _decoder_feeds(enc: Any, dec: Any, enc_feeds: dict[str, np.ndarray], batch: list[list[int]],
                   start: int, pad: int = 0) -> dict[str, np.ndarray]:
    names = [o.name for o in enc.get_outputs()]
    outs = dict(zip(names, enc.run(None, enc_feeds)))
    cross = {n.replace("present.", "past_key_values."): v for n, v in outs.items() if n.startswith("present.")}
    ids = _pad([[start] + s for s in batch], left=False, pad=pad)["input_ids"]  # [B, 1 + T]: the decoder start token, then the text
    return {"input_ids": ids, "encoder_attention_mask": enc_feeds["attention_mask"],
            **_empty_past(dec, len(batch), "decoder"), **cross}
