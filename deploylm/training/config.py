"""What a training run is asked to do (TrainConfig) and what it returns (TrainResult).

The defaults are tuned for `--task digits2words --size tiny` on 2 CPU cores (docs/training.md).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deploylm.errors import UsageError
from deploylm.models.config import PRESETS
from deploylm.training.schedule import SCHEDULES


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Exactly one of `task` (a built-in task name) and `data` (a .jsonl file)."""

    out: Path
    task: str | None = None
    data: Path | None = None
    size: str = "tiny"
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3                  # peak learning rate, reached after `warmup` steps
    warmup: int = 200
    schedule: str = "inverse_sqrt"    # or "cosine" (decays to 0 at `steps`)
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
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
            raise UsageError("give exactly one of --task NAME or --data FILE.jsonl")
        if self.resume and self.force:
            raise UsageError("--resume and --force contradict each other: give one")
        for name in ("steps", "batch_size", "eval_every", "checkpoint_every", "eval_examples", "vocab_size"):
            _positive_int(name, getattr(self, name))
        _nonnegative_int("warmup", self.warmup)
        _nonnegative_int("threads", self.threads)
        for name in ("lr", "clip_norm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise UsageError(f"--{name.replace('_', '-')} {value!r}: expected a positive number")
        if not 0 <= self.label_smoothing < 1 or not 0 <= self.weight_decay:
            raise UsageError(f"label_smoothing {self.label_smoothing} / weight_decay {self.weight_decay}: expected [0, 1) and >= 0")
        if self.size not in PRESETS:
            raise UsageError(f"unknown --size {self.size!r}: expected one of {', '.join(PRESETS)}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown schedule {self.schedule!r}: expected one of {', '.join(SCHEDULES)}")
        if self.device not in ("cpu", "cuda"):
            raise UsageError(f"unknown --device {self.device!r}: expected cpu or cuda")

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues."""
        return {"task": self.task, "data": None if self.data is None else str(self.data.resolve()),
                "size": self.size, "batch_size": self.batch_size, "seed": self.seed, "vocab_size": self.vocab_size}

    def as_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UsageError(f"--{name.replace('_', '-')} {value!r}: expected a positive integer")


def _nonnegative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"--{name} {value!r}: expected an integer >= 0")


@dataclass(frozen=True)
class TrainResult:
    """What a run produced: the checkpoint folder, test-split metrics and the run's history."""

    out: Path
    steps: int
    test: dict[str, float]                       # loss, perplexity, exact_match, bleu
    examples: list[tuple[str, str, str]]         # (source, generated, reference) from the test split
    losses: list[float]                          # training loss of every step (resumed runs included)
    validation: list[dict[str, float]] = field(default_factory=list)   # one entry per evaluation
    wall_s: float = 0.0                          # this process's training + evaluation time
    tokens_per_s: float = 0.0                    # training throughput over the optimizer steps only
