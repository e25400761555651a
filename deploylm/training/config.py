"""What a training run is asked to do (TrainConfig) and what it returns (TrainResult).

The defaults are tuned for `--task digits2words --size tiny` on 2 CPU cores (docs/training.md).
`arch="decoder"` trains the decoder-only LM on text (`--task stories` or `--data FILE.txt`).
"""
from __future__ import annotations

import hashlib

import math
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from deploylm.errors import UsageError
from deploylm.models.config import PRESETS
from deploylm.training.clean import CleanOptions

SCHEDULES = ("inverse_sqrt", "cosine")   # deploylm.training.schedule; here, without torch, for the CLI's --help

ARCHS = ("seq2seq", "decoder")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Exactly one of `task` (a built-in task name) and `data` (a .jsonl or text file)."""

    out: Path
    task: str | None = None
    data: Path | None = None
    arch: str = "seq2seq"             # "seq2seq" (pairs) | "decoder" (decoder-only LM on text)
    size: str = "tiny"
    steps: int = 1000
    batch_size: int = 64              # the GLOBAL batch: split across processes under DDP
    lr: float = 1e-3                  # peak learning rate, reached after `warmup` steps
    warmup: int = 200
    schedule: str = "inverse_sqrt"    # or "cosine" (decays to 0 at `steps`)
    weight_decay: float = 0.01
    label_smoothing: float | None = None   # None: 0.1 for seq2seq, 0 for the LM (smoothing inflates perplexity)
    dropout: float | None = None      # None: the size preset's (0.1)
    block_size: int = 64              # decoder: tokens per training sequence
    stride: int | None = None         # decoder: tokens between sequence starts (None: block_size, no overlap)
    ngram_order: int = 3              # decoder: n of the n-gram baseline (0: no baseline)
    clean: CleanOptions = field(default_factory=CleanOptions)   # --data cleaning (built-in tasks are clean)
    clip_norm: float = 1.0
    seed: int = 0
    eval_every: int = 250             # validation every N steps (and at the end)
    checkpoint_every: int = 500       # checkpoint every N steps (and at the end)
    eval_examples: int = 500          # validation examples per evaluation (all of test at the end)
    vocab_size: int = 1000            # BPE vocabulary (upper bound; small tasks learn fewer merges)
    device: str = "cpu"               # "cpu" | "cuda"
    threads: int = 1                  # CPU threads for PyTorch (0: its default); 1 is robust on busy machines
    amp: bool = True                  # mixed precision (CUDA only)
    resume: bool = False
    force: bool = False
    progress: bool = True             # progress bar and evaluation lines on stderr

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.data is not None:
            object.__setattr__(self, "data", Path(self.data))
        if (self.task is None) == (self.data is None):
            raise UsageError("give exactly one of --task NAME or --data FILE (.jsonl pairs, or text with --arch decoder)")
        if self.arch not in ARCHS:
            raise UsageError(f"unknown --arch {self.arch!r}: expected one of {', '.join(ARCHS)}")
        if self.arch == "seq2seq" and self.data is not None and self.data.suffix.lower() != ".jsonl":
            raise UsageError(f"--data {str(self.data)!r}: the seq2seq model trains on a .jsonl file of source/target "
                             "pairs; plain text trains the decoder-only LM: add --arch decoder")
        if self.resume and self.force:
            raise UsageError("--resume and --force contradict each other: give one")
        for name in ("steps", "batch_size", "eval_every", "checkpoint_every", "eval_examples", "vocab_size", "block_size"):
            _positive_int(name, getattr(self, name))
        for name in ("warmup", "threads", "ngram_order"):
            _nonnegative_int(name, getattr(self, name))
        check_seed(self.seed)
        if self.stride is not None:
            _positive_int("stride", self.stride)
            if self.stride > self.block_size:
                raise UsageError(f"--stride {self.stride}: expected at most --block-size {self.block_size} (no token skipped)")
        for name in ("lr", "clip_norm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise UsageError(f"--{name.replace('_', '-')} {value!r}: expected a positive number")
        if not 0 <= self.smoothing < 1 or not 0 <= self.weight_decay:
            raise UsageError(f"label_smoothing {self.label_smoothing} / weight_decay {self.weight_decay}: expected [0, 1) and >= 0")
        if self.dropout is not None and (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
                                         or not 0 <= self.dropout < 1):
            raise UsageError(f"--dropout {self.dropout!r}: expected a number in [0, 1)")
        if self.size not in PRESETS:
            raise UsageError(f"unknown --size {self.size!r}: expected one of {', '.join(PRESETS)}")
        if self.block_size > PRESETS[self.size].max_positions:
            raise UsageError(f"--block-size {self.block_size}: expected at most the model's {PRESETS[self.size].max_positions} positions")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown schedule {self.schedule!r}: expected one of {', '.join(SCHEDULES)}")
        if self.device not in ("cpu", "cuda"):
            raise UsageError(f"unknown --device {self.device!r}: expected cpu or cuda")

    @property
    def smoothing(self) -> float:
        """The label smoothing used: as given, else 0.1 for seq2seq and 0 for the LM."""
        if self.label_smoothing is not None:
            return self.label_smoothing
        return 0.1 if self.arch == "seq2seq" else 0.0

    @property
    def window_stride(self) -> int:
        return self.stride or self.block_size

    @cached_property
    def data_sha256(self) -> str | None:
        """The --data file's digest, read once: plan_run asks for it as the data is loaded, and every
        checkpoint then records that value (not a re-read of a file that may have changed since)."""
        return file_sha256(Path(self.data)) if self.data is not None and Path(self.data).is_file() else None

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues (not the process count)."""
        ident = {"task": self.task, "data": None if self.data is None else str(self.data.resolve()),
                 "size": self.size, "batch_size": self.batch_size, "seed": self.seed, "vocab_size": self.vocab_size,
                 "arch": self.arch, "dropout": self.dropout, "lr": self.lr, "warmup": self.warmup,
                 "schedule": self.schedule, "weight_decay": self.weight_decay, "label_smoothing": self.smoothing,
                 "clip_norm": self.clip_norm,
                 "clean": self.clean.as_json() if self.data is not None else None}
        if self.schedule == "cosine":        # it decays to 0 at `steps`: more steps would raise the rate again
            ident["cosine_steps"] = self.steps
        if self.data_sha256 is not None:     # other contents at the same path: another run
            ident["data_sha256"] = self.data_sha256
        if self.arch == "decoder":
            ident.update(block_size=self.block_size, stride=self.window_stride)
        return ident

    def as_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_seed(seed: Any) -> None:
    """--seed: an integer numpy, random and torch all take (0 .. 2**32 - 1)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 32:
        raise UsageError(f"--seed {seed!r}: expected an integer from 0 to {2 ** 32 - 1}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UsageError(f"--{name.replace('_', '-')} {value!r}: expected a positive integer")


def _nonnegative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"--{name.replace('_', '-')} {value!r}: expected an integer >= 0")


@dataclass(frozen=True)
class TrainResult:
    """What a run produced: the checkpoint folder, test-split metrics and the run's history."""

    out: Path
    steps: int
    test: dict[str, float]                       # loss, perplexity (+ seq2seq: exact_match, bleu; LM: tokens)
    examples: list[tuple[str, str, str]]         # (source or prompt, generated, reference) from the test split
    losses: list[float]                          # training loss of every step (resumed runs included)
    validation: list[dict[str, float]] = field(default_factory=list)   # one entry per evaluation
    wall_s: float = 0.0                          # this process's training + evaluation time
    tokens_per_s: float | None = None            # training throughput over this process's optimizer steps (all
                                                 # ranks); None when it ran none (--resume past --steps)
    arch: str = "seq2seq"
    baseline: dict[str, Any] | None = None       # LM: the n-gram baseline on the same test tokens
    cleaning: dict[str, Any] | None = None       # --data: CleanReport.as_json()
    world_size: int = 1                          # processes that trained (DDP)
    resumed_at: int | None = None                # --resume: the step the saved run was at (None: a fresh run)
