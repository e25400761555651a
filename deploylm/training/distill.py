"""Knowledge distillation: `distill(DistillConfig) -> DistillResult`.

Loss per labelled token (Hinton et al. 2015):
    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, label)

Teachers and their data:
- a deploylm encoder-decoder checkpoint on a built-in task (--task) or a .jsonl file (--data), with
  the teacher's tokenizer and the training package's splits and batches; by default the task and
  split seed the teacher was trained with (its training_state.pt), so the student never trains on
  the teacher's test split;
- a Hugging Face causal LM folder or a deploylm decoder-only checkpoint on a plain text file (--data):
  the text is tokenized with the teacher's tokenizer and cut into blocks of `block_size` tokens; the
  last tenth of the blocks is held out for perplexity. A deploylm teacher reads the text as its
  training did (paragraphs or .jsonl "text"s, each as `<s> doc </s>`, blocks of the size it trained
  with); a Hugging Face teacher reads lines without special tokens, blocks of 128.

The student is the teacher's configuration with fewer layers per stack (--layers; default half,
rounded up) initialised from evenly spaced teacher layers, first and last kept ([0, 2, 4, 7, 9, 11]
of 12, as DistilBERT), plus the teacher's embeddings, norms and output layer. With --d-model unlike
the teacher's (deploylm checkpoints only) the student is initialised at random. It is saved as an
ordinary checkpoint or Hugging Face folder (with the teacher's tokenizer and distill.json), atomically.
An interrupt (Ctrl-C, SIGTERM) while it trains saves nothing (there is no checkpoint to resume from); one during
the final evaluation saves the trained student with null metrics, marked `"final_evaluation": "interrupted"`.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from deploylm.errors import UsageError
from deploylm.training.config import check_seed

if TYPE_CHECKING:   # torch is imported where it runs: `deploylm --help` and `distill --help` need none of it
    import torch
    from torch import Tensor

REPORT = "distill.json"
WARMUP_EXAMPLES = 8       # evaluated (untimed) by teacher and student before the timed evaluation


@dataclass(frozen=True)
class DistillConfig:
    """One distillation run; `task`/`data` as described in the module docstring."""

    teacher: Path
    out: Path
    layers: int | None = None         # layers per stack of the student; default: half the teacher's
    d_model: int | None = None        # student width (deploylm checkpoints); unlike the teacher's -> random init
    temperature: float = 2.0
    alpha: float = 0.5
    steps: int = 2000
    task: str | None = None
    data: Path | None = None
    batch_size: int = 64
    lr: float | None = None           # None: LR_FROM_TEACHER, or LR_FROM_SCRATCH for a random-init student
    warmup: int = 100                 # capped at steps // 10
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    block_size: int | None = None     # text: tokens per block (None: a deploylm teacher's own, else 128)
    eval_examples: int = 500          # seq2seq: test examples decoded for teacher and student
    seed: int = 0
    device: str = "cpu"
    threads: int = 1                  # CPU threads for PyTorch (0: its default)
    force: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "teacher", Path(self.teacher))
        object.__setattr__(self, "out", Path(self.out))
        if self.data is not None:
            object.__setattr__(self, "data", Path(self.data))
        if self.task is not None and self.data is not None:
            raise UsageError("give one of --task NAME or --data FILE, not both")
        for name in ("steps", "batch_size", "eval_examples"):
            _check_int(name, getattr(self, name), 1)
        for name in ("layers", "d_model", "block_size"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        _check_int("warmup", self.warmup, 0)
        _check_int("threads", self.threads, 0)
        check_seed(self.seed)
        if not _finite(self.temperature) or self.temperature <= 0:
            raise UsageError(f"--temperature {self.temperature!r}: expected a number > 0")
        if not _finite(self.alpha) or not 0 <= self.alpha <= 1:
            raise UsageError(f"--alpha {self.alpha!r}: expected a number in [0, 1]")
        for name in ("lr", "clip_norm"):
            if name == "lr" and self.lr is None:
                continue
            if not _finite(getattr(self, name)) or getattr(self, name) <= 0:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: expected a number > 0")
        if not _finite(self.weight_decay) or self.weight_decay < 0:
            raise UsageError(f"--weight-decay {self.weight_decay!r}: expected a number >= 0")
        if self.device not in ("cpu", "cuda"):
            raise UsageError(f"--device {self.device!r}: expected cpu or cuda")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"--{name.replace('_', '-')} {value!r}: expected an integer >= {minimum}")


@dataclass(frozen=True)
class DistillResult:
    """What a run produced. `teacher`/`student`: evaluation of each on the same held-out data."""

    out: Path
    steps: int
    kept_layers: dict[str, list[int]]            # layer list -> teacher layers the student started from
    init: str                                    # "teacher" (copied layers) or "random" (other width)
    losses: list[dict[str, float]]               # per step: total, kd, ce
    teacher: dict[str, float] | None             # None: the final evaluation was interrupted (the student is saved)
    student: dict[str, float] | None
    parameters: dict[str, int] = field(default_factory=dict)   # teacher / student parameter counts
    wall_s: float = 0.0

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        data["losses"] = {"first": self.losses[0], "last": self.losses[-1]} if self.losses else {}
        return data


# ---- the loss and the student's layers --------------------------------------------------------


def distillation_loss(student: Tensor, teacher: Tensor, labels: Tensor, temperature: float,
                      alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """student/teacher logits [B, T, V], labels [B, T] (-100 = ignore) -> (total, kd, ce), each a mean
    over labelled tokens; kd = T^2 * KL(p_teacher || p_student) at temperature T."""
    import torch.nn.functional as F

    keep = labels != -100                                            # [B, T]
    s, t = student[keep].float(), teacher[keep].float()              # [N, V]
    kd = F.kl_div((s / temperature).log_softmax(-1), (t / temperature).log_softmax(-1),
                  log_target=True, reduction="batchmean") * temperature ** 2
    ce = F.cross_entropy(s, labels[keep])
    return alpha * kd + (1 - alpha) * ce, kd, ce


def select_layers(n: int, k: int) -> list[int]:
    """k of n layer indices, evenly spaced with the first and last kept (k = 1: the first)."""
    if not 1 <= k <= n:
        raise UsageError(f"cannot keep {k} of {n} layers: expected 1..{n}")
    return [0] if k == 1 else [round(i * (n - 1) / (k - 1)) for i in range(k)]


def plan_layers(stacks: dict[str, int], layers: int | None, width_changes: bool) -> dict[str, list[int]]:
    """Per layer list (name -> teacher depth), the teacher layers the student keeps.

    layers=None halves every stack (rounded up); layers=N keeps min(N, depth) of each stack and must
    be below the deepest stack's depth.
    """
    deepest = max(stacks.values())
    if layers is not None and layers >= deepest:
        raise UsageError(f"--layers {layers}: expected fewer than the teacher's {deepest} layers")
    kept = {name: select_layers(n, math.ceil(n / 2) if layers is None else min(layers, n)) for name, n in stacks.items()}
    if not width_changes and all(len(kept[name]) == n for name, n in stacks.items()):
        raise UsageError(f"the teacher has {deepest} layer(s) per stack: nothing to remove; give --d-model for a narrower student")
    return kept


def remap_layers(state: dict[str, Tensor], kept: dict[str, list[int]]) -> dict[str, Tensor]:
    """The teacher's state dict renamed for the student: `<list>.<kept[j]>.*` -> `<list>.<j>.*`;
    layers not kept are dropped, everything else (embeddings, norms, output layer) is copied."""
    out = {}
    for key, value in state.items():
        prefix = next((p for p in kept if key.startswith(p + ".")), None)
        if prefix is None:
            out[key] = value
            continue
        index, rest = key[len(prefix) + 1:].split(".", 1)
        if int(index) in kept[prefix]:
            out[f"{prefix}.{kept[prefix].index(int(index))}.{rest}"] = value
    return out


# ---- the run ----------------------------------------------------------------------------------


@dataclass
class Setup:
    """A teacher/student pair and its data; built by deploylm.training.distill_setup."""

    teacher: torch.nn.Module
    student: torch.nn.Module
    kept: dict[str, list[int]]
    init: str
    batch: Callable[[int], tuple[dict[str, Tensor], Tensor]]        # step -> (model inputs, labels [B, T])
    logits: Callable[[torch.nn.Module, dict[str, Tensor]], Tensor]  # (model, inputs) -> [B, T, V]
    evaluate: Callable[[torch.nn.Module, int | None], dict[str, float]]      # (model, limit) -> metrics
    save: Callable[[Path], None]                                    # write the student folder (must not exist)
    data_record: dict[str, Any] = field(default_factory=dict)   # what the data was, in distill.json for export's
    # calibration: {"task", "seed"} of a built-in task, or {"data" (absolute), "seed", "clean", "data_sha256", "arch"}
    block_size: int | None = None    # text: tokens per block that the run uses


LR_FROM_TEACHER = 5e-4   # a student made of the teacher's own layers only needs adjusting
LR_FROM_SCRATCH = 1e-3   # another width: random init learns from scratch (the digits2words d64 student at 5e-4
                         # reached 61.8% exact match in 2000 steps; at 1e-3 and 5000 steps 99.7%)


def default_lr(config: DistillConfig, init: str) -> float:
    """--lr, or the default for how the student starts ("teacher" layers or "random" weights)."""
    if config.lr is not None:
        return config.lr
    return LR_FROM_SCRATCH if init == "random" else LR_FROM_TEACHER


def distill(config: DistillConfig, on_step: Callable[[int, dict[str, float]], None] | None = None) -> DistillResult:
    """Distil the teacher of `config` into a smaller student saved at `config.out`. A second distill into the
    same --out while this one runs is refused (its check of --out passed before this one wrote there)."""
    from deploylm.fsutil import exclusive_writer

    with exclusive_writer(config.out):
        return _distill_locked(config, on_step)


def _distill_locked(config: DistillConfig, on_step: Callable[[int, dict[str, float]], None] | None) -> DistillResult:
    import torch

    from deploylm.training import distill_setup

    distill_setup.check_output(config)
    threads = torch.get_num_threads()
    if config.threads and config.device == "cpu":
        torch.set_num_threads(config.threads)
    try:
        started = time.perf_counter()
        torch.manual_seed(config.seed)
        setup = distill_setup.build(config)
        config = dataclasses.replace(config, lr=default_lr(config, setup.init),   # what ran, in distill.json
                                     warmup=min(config.warmup, config.steps // 10),
                                     block_size=setup.block_size)
        losses = _train(setup, config, on_step)

        def result(teacher: dict[str, float] | None, student: dict[str, float] | None) -> DistillResult:
            return DistillResult(config.out, config.steps, setup.kept, setup.init, losses, teacher, student,
                                 {"teacher": _count(setup.teacher), "student": _count(setup.student)},
                                 time.perf_counter() - started)

        try:
            teacher, student = _evaluate_both(setup)
        except (KeyboardInterrupt, SystemExit):   # Ctrl-C, SIGTERM: the student is trained; keep it, then stop
            print(stopped_evaluation(config, setup, result(None, None)), file=sys.stderr)
            raise
        done = result(teacher, student)
        distill_setup.publish(config, setup.save, _report(setup, done))
        return done
    finally:
        torch.set_num_threads(threads)


def _report(setup: Setup, result: DistillResult, **extra: Any) -> dict[str, Any]:
    """distill.json beside the student (publish adds the settings): the data, as export's calibration finds it, and
    the run's result."""
    return {"task": None, **setup.data_record, **result.as_json(), **extra}


def stopped_evaluation(config: DistillConfig, setup: Setup, known: DistillResult) -> str:
    """Save the trained student of a run stopped during its final evaluation, as the normal end does (atomically),
    with a distill.json whose teacher and student metrics are null and `final_evaluation: "interrupted"`: every step
    ran, and distill has no --resume, so dropping it would throw the whole run away. The line says what --out holds.
    A save that fails (a full disk) is named in the line instead of hiding the interrupt; a second interrupt while
    it saves stops it, and publish removes the temporary folder (no half-written student is left)."""
    from deploylm.errors import CheckpointWriteFailed
    from deploylm.training import distill_setup

    try:
        distill_setup.publish(config, setup.save, _report(setup, known, final_evaluation="interrupted"))
    except CheckpointWriteFailed as exc:
        return f"interrupted during the final evaluation, and the trained student was not kept: {exc}"
    return (f"interrupted during the final evaluation: {str(config.out)!r} holds the trained student (all "
            f"{config.steps} steps), but its evaluation against the teacher did not run (distill.json: metrics null, "
            "final_evaluation \"interrupted\")")


def interrupted_line(config: DistillConfig, done: int) -> str:
    """What a run stopped while it trains leaves: nothing, as distill keeps no checkpoint to resume from."""
    return (f"interrupted at step {done} of {config.steps}: nothing was written to {str(config.out)!r} (distill saves "
            "the student only after its last step and keeps no checkpoint to resume from); run the same command again "
            "to start over")


def _train(setup: Setup, config: DistillConfig, on_step: Callable[[int, dict[str, float]], None] | None) -> list[dict[str, float]]:
    """`config.steps` AdamW steps of the distillation loss; per-step losses."""
    import torch
    from tqdm import tqdm

    from deploylm.training.schedule import make_optimizer, make_scheduler
    from deploylm.training.trainer import check_finite_loss, no_bar

    optimizer = make_optimizer(setup.student, config.lr, config.weight_decay)
    scheduler = make_scheduler(optimizer, min(config.warmup, config.steps // 10), config.steps, "cosine")
    setup.teacher.eval()
    losses = []
    bar = tqdm(total=config.steps, unit="step", file=sys.stderr, disable=no_bar(config.progress), desc="distill")
    try:
        for step in range(config.steps):
            inputs, labels = setup.batch(step)
            with torch.no_grad():
                teacher_logits = setup.logits(setup.teacher, inputs)           # [B, T, V]
            setup.student.train()
            total, kd, ce = distillation_loss(setup.logits(setup.student, inputs), teacher_logits, labels,
                                              config.temperature, config.alpha)
            check_finite_loss(float(total.detach()), step + 1, config.lr, None, None)   # nothing saved yet
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(setup.student.parameters(), config.clip_norm)
            optimizer.step()
            scheduler.step()
            losses.append({"total": total.detach().item(), "kd": kd.detach().item(), "ce": ce.detach().item()})
            bar.update(1)
            bar.set_postfix(kd=f"{losses[-1]['kd']:.3f}", ce=f"{losses[-1]['ce']:.3f}", refresh=False)
            if on_step is not None:
                on_step(step + 1, losses[-1])
    except (KeyboardInterrupt, SystemExit):      # Ctrl-C, SIGTERM: say that nothing is saved, then stop
        bar.write(interrupted_line(config, len(losses)), file=sys.stderr)
        raise
    finally:
        bar.close()
    setup.student.eval()
    return losses


def _evaluate_both(setup: Setup) -> tuple[dict[str, float], dict[str, float]]:
    """Teacher and student metrics on the same held-out data, each timed after a short warm-up."""
    for model in (setup.teacher, setup.student):
        setup.evaluate(model, WARMUP_EXAMPLES)
    return setup.evaluate(setup.teacher, None), setup.evaluate(setup.student, None)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
