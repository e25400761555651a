"""The output folder of a run: every check made before anything is written (Plan), clearing it for
--force, metrics.json and cleaning.json."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from deploylm.errors import CheckpointWriteFailed, UsageError
from deploylm.fsutil import check_output_folder, check_writable
from deploylm.models.checkpoint import CONFIG, TOKENIZER, TRAINING_STATE, WEIGHTS, load_training_state
from deploylm.training import state as train_state
from deploylm.training.config import TrainConfig, TrainResult
from deploylm.training.data import load_pairs, pair_splits
from deploylm.training.stories import stories
from deploylm.training.tasks import TASKS, task_splits
from deploylm.training.text import load_text, text_splits
from deploylm.training.tokenizer import write_side_files
from deploylm.training.workloads import LMWork, Seq2SeqWork

METRICS = "metrics.json"
CLEANING = "cleaning.json"
TEXT_TASKS = {"stories": "generated short stories with long-range references (deploylm/training/stories.py)"}
RUN_MARKERS = (TRAINING_STATE, METRICS, CLEANING)   # files only `deploylm train` writes into --out
# the keys that make a metrics.json or cleaning.json deploylm's (other tools write files of those names)
_MARKER_KEYS = {METRICS: ("arch", "seed", "steps", "test"), CLEANING: ("options", "records_in", "kept", "dropped")}


def is_training_run(folder: Path) -> bool:
    """A folder `deploylm train` made: its training_state.pt, a metrics.json or cleaning.json with
    deploylm's keys (cleaning.json is written first, so a run stopped before its first checkpoint
    counts), or a deploylm checkpoint's config.json; never an exported artifact (manifest.json) nor a
    Hugging Face folder, which have a config.json too."""
    from deploylm.models.source import folder_source

    if (folder / "manifest.json").exists():
        return False
    if (folder / TRAINING_STATE).exists() or any(_is_ours(folder / name, keys) for name, keys in _MARKER_KEYS.items()):
        return True
    try:
        return folder_source(folder).kind == "checkpoint"     # the one rule for a deploylm config.json
    except UsageError:                                         # none, or not JSON: not ours
        return False


def _is_ours(path: Path, keys: tuple[str, ...]) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and all(key in data for key in keys)


@dataclass(frozen=True)
class Plan:
    """A checked request: the workload (data splits) and, for --resume, the saved training state."""

    out: Path
    work: Seq2SeqWork | LMWork
    resume_state: dict[str, Any] | None
    force: bool
    cleaning: dict[str, Any] | None = None     # CleanReport.as_json() for --data
    cleaning_summary: str | None = None

    def clear_output(self) -> None:
        """Remove the previous run in `out` (only with --force; plan_run checked it is a run). An `out` that is a
        symbolic link stands for the folder it points to (as for export and checkpoints): that folder is emptied
        and the link kept (rmtree refuses a link; removing the folder would leave the link dangling)."""
        if self.force and self.out.exists():
            if self.out.is_symlink():
                folder = self.out.resolve()
                shutil.rmtree(folder)
                folder.mkdir()
            else:
                shutil.rmtree(self.out)


def plan_run(config: TrainConfig) -> Plan:
    """Check the request and load its data; UsageError (and nothing written) on bad input."""
    work, report = _workload(config)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available to PyTorch; use --device cpu")
    config.data_sha256   # the data as loaded now is what this run's checkpoints record (cached on config)
    saved = _resume_state(config) if config.resume else _check_fresh(config)
    return Plan(config.out, work, saved, config.force, report and report.as_json(), report and report.summary())


@contextlib.contextmanager
def _naming_the_drops(report: Any) -> Iterator[None]:
    """A too-small data file after cleaning says what cleaning dropped (e.g. every Chinese pair is
    one "word" under --length-unit words), not only how few records were left."""
    try:
        yield
    except UsageError as exc:
        if report is None or report.kept == report.records_in:
            raise
        raise UsageError(f"{exc}; {report.summary()}") from None


def _workload(config: TrainConfig) -> tuple[Seq2SeqWork | LMWork, Any]:
    """The workload of the request and, for --data, its cleaning report."""
    report = None
    if config.arch == "seq2seq":
        if config.task in TEXT_TASKS:
            raise UsageError(f"task {config.task!r} is text for the decoder-only LM: add --arch decoder "
                             f"(seq2seq tasks: {', '.join(TASKS)})")
        if config.task and config.task not in TASKS:
            raise UsageError(f"unknown task {config.task!r}: expected one of {', '.join(TASKS)} (seq2seq), or "
                             f"{', '.join(TEXT_TASKS)} with --arch decoder")
        if config.task:
            splits = task_splits(config.task, config.seed)
        else:
            examples, report = load_pairs(config.data, config.clean)
            with _naming_the_drops(report):
                splits = pair_splits(config.data, examples, config.seed)
        return Seq2SeqWork(splits, config.eval_examples), report
    if config.task:
        if config.task not in TEXT_TASKS:
            known = f"text tasks: {', '.join(TEXT_TASKS)}" + (f" ({config.task!r} is a seq2seq task: drop --arch decoder)"
                                                               if config.task in TASKS else "")
            raise UsageError(f"unknown task {config.task!r} for --arch decoder: expected one of the {known}")
        splits = text_task_splits(config.task, config.seed)
    else:
        docs, report = load_text(config.data, config.clean)
        with _naming_the_drops(report):
            splits = text_splits(str(config.data), docs, config.seed)
    return LMWork(splits, config.block_size, config.window_stride, config.ngram_order, config.eval_examples), report


def text_task_splits(task: str, seed: int) -> Any:
    """The train/validation/test documents of a built-in text task (TEXT_TASKS) for `seed`: what
    `train --arch decoder --task` trains on, and what distillation and export's calibration read again."""
    return text_splits(f"task {task}", stories(seed), seed)


def _check_fresh(config: TrainConfig) -> None:
    check_output_folder(config.out, config.force, holds="the checkpoint", inputs={"--data": config.data},
                        ours=is_training_run,
                        not_ours=f"does not look like a training run (no {', '.join(RUN_MARKERS)}, no deploylm "
                                 "checkpoint)",
                        without_force="it holds no checkpoint yet (the run stopped before its first): use --force "
                        "to start over" if _started_without_checkpoint(config.out) else
                        f"it {_MODEL_WITHOUT_STATE}: choose another --out, or --force to replace it"
                        if _model_without_state(config.out) else
                        "use --resume to continue it or --force to start over")


_MODEL_WITHOUT_STATE = (f"holds a model without {TRAINING_STATE} (a distilled student or a saved model, not a run "
                        "--resume can continue)")


def _model_without_state(out: Path) -> bool:
    """A deploylm model folder that no training run can continue: weights, and no training state."""
    return out.is_dir() and (out / WEIGHTS).is_file() and not (out / TRAINING_STATE).is_file()


def _started_without_checkpoint(out: Path) -> bool:
    """A training run stopped before its first checkpoint (cleaning.json and nothing to resume); not a model
    folder without training state (a distilled student is a deploylm checkpoint too)."""
    return (out.is_dir() and not (out / TRAINING_STATE).is_file() and not (out / WEIGHTS).is_file()
            and is_training_run(out))


def _resolved(identity: dict[str, Any]) -> dict[str, Any]:
    """An identity with dropout None (the size preset's) replaced by the preset's value, so that
    `--dropout 0.1` resumes a run that left it at the tiny preset's 0.1."""
    from deploylm.models.config import PRESETS

    if identity.get("dropout") is None and identity.get("size") in PRESETS and "dropout" in identity:
        return {**identity, "dropout": PRESETS[identity["size"]].dropout}
    return identity


def _resume_state(config: TrainConfig) -> dict[str, Any]:
    out = config.out
    if not all((out / name).is_file() for name in (CONFIG, WEIGHTS, TOKENIZER, TRAINING_STATE)):
        raise UsageError(f"--resume: {str(out)!r} holds no checkpoint with training state: nothing to resume"
                         + ("; the run stopped before its first checkpoint (--checkpoint-every): start it again "
                            "with --force" if _started_without_checkpoint(out) else
                            f"; it {_MODEL_WITHOUT_STATE}" if _model_without_state(out) else ""))
    check_writable(out, f"--resume {str(out)!r}")   # its checkpoints and metrics.json are written there
    saved = load_training_state(out)
    train_state.check(saved, str(out / TRAINING_STATE))
    mine, theirs = _resolved(config.identity()), _resolved(saved.get("identity", {}))
    if theirs.get("data_sha256") is not None and theirs.get("data_sha256") == mine.get("data_sha256"):
        mine = {**mine, "data": theirs.get("data")}   # the same file moved (another folder or machine): the same data
    differ = [_differs(key, theirs.get(key), mine[key]) for key in mine  # keys older runs lack are not compared
              if key in theirs and theirs.get(key) != mine[key]]
    if differ:
        raise UsageError(f"--resume: {str(out)!r} was trained with {'; '.join(differ)}: use the same settings or --force")
    return saved


def _differs(key: str, then: Any, now: Any) -> str:
    """One setting a resumed run differs in, for the refusal; the data's digests in words."""
    if key == "data_sha256" and isinstance(then, str) and isinstance(now, str):
        return f"other --data contents (data_sha256 {then[:12]}..., now {now[:12]}...: the file changed)"
    return f"{key} {then!r} (now {now!r})"


def write_metrics(config: TrainConfig, result: TrainResult, interrupted: bool = False) -> Path:
    """metrics.json in the output folder (replaced atomically): test metrics, examples, history; `interrupted`:
    the final evaluation was stopped (Ctrl-C, SIGTERM), so `test` is null and `final_evaluation` says so."""
    first = "source" if config.arch == "seq2seq" else "prompt"
    data = {"task": config.task, "data": None if config.data is None else str(Path(config.data).resolve()),
            "arch": config.arch, "seed": config.seed, "data_sha256": config.data_sha256,
            "clean": config.clean.as_json() if config.data is not None else None,
            "size": config.size, "steps": result.steps, "world_size": result.world_size, "test": result.test,
            "baseline": result.baseline, "cleaning": result.cleaning,
            "examples": [{first: s, "generated": g, "reference": r} for s, g, r in result.examples],
            "validation": result.validation, "final_train_loss": result.losses[-1] if result.losses else None,
            "wall_s": round(result.wall_s, 2), "tokens_per_s": None if result.tokens_per_s is None else round(result.tokens_per_s, 1)}
    if interrupted:
        data["final_evaluation"] = "interrupted"
    return write_json(config.out / METRICS, data)


def write_json(path: Path, data: Any) -> Path:
    """`data` as indented JSON at `path`, replaced atomically; a full disk (or a folder made read-only) is
    one CheckpointWriteFailed line, and its temporary file is removed (as are those of writers killed outright,
    which every later checkpoint save would otherwise carry over)."""
    from deploylm.fsutil import remove_stale_temporaries

    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise CheckpointWriteFailed(f"could not write {str(path)!r}: {exc.strerror or exc}; free space or choose "
                                    "another folder") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_tokenizer_side_files(out: Path, model_max_length: int) -> None:
    """The HF tokenizer config files next to tokenizer.json (the checkpoint writes tokenizer.json)."""
    write_side_files(out, model_max_length)
