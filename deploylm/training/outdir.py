"""The output folder of a run: every check made before anything is written (Plan), clearing it for
--force, and metrics.json."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deploylm.errors import UsageError
from deploylm.models.checkpoint import CONFIG, TOKENIZER, TRAINING_STATE, WEIGHTS, load_training_state
from deploylm.training import state as train_state
from deploylm.training.config import TrainConfig, TrainResult
from deploylm.training.data import jsonl_splits
from deploylm.training.tasks import Splits, task_splits
from deploylm.training.tokenizer import write_side_files

METRICS = "metrics.json"
RUN_MARKERS = (CONFIG, TRAINING_STATE, METRICS)   # a folder holding one of these is a training run


@dataclass(frozen=True)
class Plan:
    """A checked request: the data splits and, for --resume, the saved training state."""

    out: Path
    splits: Splits
    resume_state: dict[str, Any] | None
    force: bool

    def clear_output(self) -> None:
        """Remove the previous run in `out` (only with --force; plan_run checked it is a run)."""
        if self.force and self.out.exists():
            shutil.rmtree(self.out)


def plan_run(config: TrainConfig) -> Plan:
    """Check the request and load its data; UsageError (and nothing written) on bad input."""
    splits = task_splits(config.task, config.seed) if config.task else jsonl_splits(config.data, config.seed)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available to PyTorch; use --device cpu")
    return Plan(config.out, splits, _resume_state(config) if config.resume else _check_fresh(config), config.force)


def _check_fresh(config: TrainConfig) -> None:
    out = config.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {str(out)!r} is a file: expected a folder for the checkpoint")
    if not out.exists() or not any(out.iterdir()):
        return None
    if not config.force:
        raise UsageError(f"output folder {str(out)!r} exists: use --resume to continue it or --force to start over")
    if not any((out / name).exists() for name in RUN_MARKERS):
        raise UsageError(f"--force: {str(out)!r} does not look like a training run (no {', '.join(RUN_MARKERS)}): refusing to delete it")
    return None


def _resume_state(config: TrainConfig) -> dict[str, Any]:
    out = config.out
    if not all((out / name).is_file() for name in (CONFIG, WEIGHTS, TOKENIZER, TRAINING_STATE)):
        raise UsageError(f"--resume: {str(out)!r} holds no checkpoint with training state: nothing to resume")
    saved = load_training_state(out)
    train_state.check(saved, str(out / TRAINING_STATE))
    mine, theirs = config.identity(), saved.get("identity", {})
    differ = [f"{key} {theirs.get(key)!r} (now {mine[key]!r})" for key in mine if theirs.get(key) != mine[key]]
    if differ:
        raise UsageError(f"--resume: {str(out)!r} was trained with {'; '.join(differ)}: use the same settings or --force")
    return saved


def write_metrics(config: TrainConfig, result: TrainResult) -> Path:
    """metrics.json in the output folder (replaced atomically): test metrics, examples, history."""
    path = config.out / METRICS
    data = {"task": config.task, "data": None if config.data is None else str(config.data),
            "size": config.size, "steps": result.steps, "test": result.test,
            "examples": [{"source": s, "generated": g, "reference": r} for s, g, r in result.examples],
            "validation": result.validation, "final_train_loss": result.losses[-1] if result.losses else None,
            "wall_s": round(result.wall_s, 2), "tokens_per_s": round(result.tokens_per_s, 1)}
    tmp = path.with_name(f".{METRICS}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def write_tokenizer_side_files(out: Path, model_max_length: int) -> None:
    """The HF tokenizer config files next to tokenizer.json (the checkpoint writes tokenizer.json)."""
    write_side_files(out, model_max_length)
