"""The training loop: `train(TrainConfig) -> TrainResult`, in one process or data-parallel (DDP).

Fixed pipeline: check the request (nothing written on bad input) -> workload (data splits) ->
tokenizer -> model, AdamW, schedule -> steps with periodic validation and checkpoints -> test-split
metrics. A checkpoint is the output folder itself (config.json, model.safetensors, tokenizer files,
generation_config.json, training_state.pt), replaced atomically every `checkpoint_every` steps.
Under torchrun (deploylm/training/distributed.py) every rank trains on its slice of the global
batch; rank 0 alone evaluates and writes the checkpoint, metrics.json and cleaning.json.
"""
from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from deploylm.errors import CheckpointWriteFailed, TrainingDiverged, UsageError
from deploylm.fsutil import exclusive_writer
from deploylm.models.checkpoint import TRAINING_STATE, build_model, load_checkpoint, save_checkpoint
from deploylm.models.config import TransformerConfig, make_config
from deploylm.training import distributed, state as train_state
from deploylm.training.config import TrainConfig, TrainResult
from deploylm.training.data import BatchStream
from deploylm.training.distributed import Dist
from deploylm.training.outdir import CLEANING, METRICS, Plan, plan_run, write_json, write_metrics, write_tokenizer_side_files
from deploylm.training.schedule import make_optimizer, make_scheduler
from deploylm.training.tokenizer import load_tokenizer
from deploylm.training.workloads import LMWork, Seq2SeqWork
from tokenizers import Tokenizer


@dataclass
class Run:
    """The live objects of a run and the history that goes into its training state."""

    model: torch.nn.Module            # the model itself (evaluated and saved)
    trained: torch.nn.Module          # what the steps call: the model, or its DDP wrapper
    model_config: TransformerConfig
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    amp_dtype: torch.dtype | None
    device: torch.device
    dist: Dist
    work: Seq2SeqWork | LMWork
    step: int = 0
    saved_step: int = 0               # the step of the newest checkpoint in --out (begun; 0: none)
    losses: list[float] = field(default_factory=list)
    validation: list[dict[str, float]] = field(default_factory=list)


def train(config: TrainConfig, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train (or resume) the run described by `config`; `on_step(step, loss)` after every step.
    Started by torchrun, joins the process group and trains data-parallel (its launcher holds --out's
    writer lock); otherwise a second command training into the same --out is refused."""
    if distributed.in_worker():
        return _train_checked(config, on_step)
    with exclusive_writer(config.out):
        return _train_checked(config, on_step)


def _train_checked(config: TrainConfig, on_step: Callable[[int, float], None] | None) -> TrainResult:
    plan = plan_run(config)                      # every check that can fail on bad input, no writes
    threads = torch.get_num_threads()
    if config.threads and config.device == "cpu":
        torch.set_num_threads(config.threads)
    dist, device = distributed.setup(config.device)
    try:
        if config.batch_size % dist.world:
            raise UsageError(f"--batch-size {config.batch_size} (the global batch): expected a multiple of the "
                             f"{dist.world} processes")
        return _train(config, plan, on_step, dist, device)
    finally:
        distributed.teardown(dist)
        torch.set_num_threads(threads)


def _train(config: TrainConfig, plan: Plan, on_step: Callable[[int, float], None] | None, dist: Dist,
           device: torch.device) -> TrainResult:
    run = _start(config, plan, dist, device)
    resumed_at = run.step if config.resume else None
    work = plan.work
    stream = BatchStream(work.train_items, config.batch_size, config.seed)
    started, tokens, step_time = time.perf_counter(), 0, 0.0
    bar = _progress_bar(config, run.step, dist)
    try:
        while run.step < config.steps:
            tick = time.perf_counter()
            if dist.rank > 0:     # dropout differs between ranks (model init was the same everywhere)
                torch.manual_seed(rank_seed(config.seed, dist.rank, run.step))
            batch = work.batch(dist.shard(stream.examples_at(run.step)))
            loss, n_tokens = _train_step(run, batch.to(run.device), config)
            check_finite_loss(loss, run.step + 1, config.lr, config.out, run.saved_step)
            step_time += time.perf_counter() - tick
            run.step += 1
            run.losses.append(loss)
            tokens += n_tokens
            _after_step(config, plan, run, stream, bar, tokens / step_time)
            if on_step is not None:
                on_step(run.step, loss)
    except (KeyboardInterrupt, SystemExit):       # Ctrl-C, SIGTERM: say what is saved, then stop
        if dist.is_main:
            bar.write(interrupted_line(config, run.step, run.saved_step), file=sys.stderr)
        raise
    finally:
        bar.close()

    def result(test: Any, examples: list[Any], baseline: Any) -> TrainResult:
        return TrainResult(config.out, run.step, test, examples, run.losses, run.validation,
                           time.perf_counter() - started, tokens / step_time if step_time > 0 else None, config.arch,
                           baseline, plan.cleaning, dist.world, resumed_at)

    try:
        test, examples, baseline = work.test(run.model, run.device) if dist.is_main else ({}, [], None)
    except (KeyboardInterrupt, SystemExit):       # the last checkpoint is saved: keep what the run knows, say how on
        if dist.is_main:
            print(stopped_evaluation(config, run.step, result(None, [], None)), file=sys.stderr)
        raise
    done = result(test, examples, baseline)
    if dist.is_main:
        write_metrics(config, done)
    dist.barrier()
    return done


def stopped_evaluation(config: TrainConfig, step: int, known: TrainResult) -> str:
    """metrics.json for a run stopped during its final evaluation (its test metrics null, marked as interrupted: the
    run's settings, history and throughput are kept, and an export finds its data there), and the line that says
    what the folder holds and how to get the test metrics: --resume at --steps only evaluates."""
    try:
        write_metrics(config, known, interrupted=True)
        written = "and a metrics.json without test metrics"
    except CheckpointWriteFailed as exc:
        written = f"but no metrics.json ({exc})"
    return (f"interrupted during the final evaluation: {str(config.out)!r} holds the trained model (the checkpoint of "
            f"step {step}) {written}; evaluate it with the same command and --resume")


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The dropout seed of rank > 0 at `step`: a function of (seed, rank, step) alone. Only rank 0's RNG
    state is in the checkpoint, so a resumed rank > 0 draws the masks of the uninterrupted run this way."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0])


def interrupted_line(config: TrainConfig, step: int, saved: int) -> str:
    """What a stopped run left: its last checkpoint (`saved`: the step of the newest one begun, the resumed one's
    included: not always a multiple of --checkpoint-every) and the command that continues from it."""
    if saved == 0 or not (config.out / TRAINING_STATE).is_file():
        return (f"interrupted at step {step}: no checkpoint saved yet (every {config.checkpoint_every} steps, "
                "--checkpoint-every); start again with --force")
    return (f"interrupted at step {step}: {str(config.out)!r} holds the checkpoint of step {saved} or earlier; "
            "continue it with the same command and --resume")


def check_finite_loss(loss: float, step: int, lr: float, out: Path | None, saved: int | None) -> None:
    """TrainingDiverged before anything is saved when the loss of `step` is NaN or infinite; `saved`: the step
    of the checkpoint kept in `out` (0: none yet, None: a run that keeps none)."""
    if math.isfinite(loss):
        return
    kept = ""
    if out is not None and saved is not None:
        kept = (f"; the last checkpoint in {str(out)!r} (step {saved}) is kept" if saved else
                "; no checkpoint was saved")
    raise TrainingDiverged(f"the training loss became {loss} at step {step} with lr {lr:g}: the weights are no longer "
                           f"usable; lower --lr or warm up over more steps (--warmup){kept}")


def _after_step(config: TrainConfig, plan: Plan, run: Run, stream: BatchStream, bar: Any, tokens_per_s: float) -> None:
    """Progress bar, periodic validation and checkpoint (rank 0) after a step."""
    bar.update(1)
    if run.step % 10 == 0 or run.step == config.steps:
        bar.set_postfix(loss=f"{run.losses[-1]:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
    last = run.step == config.steps
    if run.step % config.eval_every == 0 or last:
        if run.dist.is_main:
            res = plan.work.validate(run.model, run.device)
            run.validation.append({"step": run.step, **res})
            if config.progress:
                bar.write(f"step {run.step}: validation " + "  ".join(_fmt(k, v) for k, v in res.items()), file=sys.stderr)
        run.dist.barrier()
    if run.step % config.checkpoint_every == 0 or last:
        run.saved_step = run.step
        if run.dist.is_main:
            _save(config, run, stream)
        run.dist.barrier()


def _fmt(key: str, value: float) -> str:
    if key == "exact_match":
        return f"exact match {value:.1%}"
    return f"{key} {value:.0f}" if key == "tokens" else f"{key.replace('_', ' ')} {value:.3f}"


def _train_step(run: Run, batch: Any, config: TrainConfig) -> tuple[float, int]:
    """One optimizer step on this rank's part of the global batch; (mean loss over the global batch,
    predicted tokens in the global batch). The loss is summed here and divided by the global token count (times the
    world size, as DDP averages gradients), so N processes compute exactly one process's gradient."""
    run.model.train()
    with torch.autocast(run.device.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None):
        loss_sum, n_tokens = run.work.loss_sum(run.trained, batch, config.smoothing)   # this rank's sum
    total_tokens = run.dist.sum(float(n_tokens), run.device)
    loss = loss_sum * (run.dist.world / max(total_tokens, 1.0))
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.optimizer)
    else:
        loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.clip_norm)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.scheduler.step()
    return run.dist.sum(float(loss_sum.detach()), run.device) / max(total_tokens, 1.0), int(total_tokens)


def _start(config: TrainConfig, plan: Plan, dist: Dist, device: torch.device) -> Run:
    """Fresh or resumed run objects; the only place that writes before the first checkpoint."""
    _seed_everything(config.seed)
    if plan.resume_state is not None:
        tok = load_tokenizer(config.out)
        model, model_config = load_checkpoint(config.out, device)
    else:
        tok = _shared_tokenizer(plan, config, dist)
        overrides = {"dropout": config.dropout} if config.dropout is not None else {}
        if config.arch == "decoder":
            overrides.update(arch="decoder", n_encoder_layers=0)
        model_config = make_config(config.size, tok.get_vocab_size(), **overrides)
        model = build_model(model_config).to(device)
    plan.work.bind(tok, model_config)            # the last check that can fail on bad input (text too short)
    if dist.is_main and config.progress and getattr(plan.work, "notice", None):
        print(plan.work.notice, file=sys.stderr)
    if dist.is_main:
        _prepare_output(config, plan)
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    scheduler = make_scheduler(optimizer, config.warmup, config.steps, config.schedule)
    amp_dtype = _amp_dtype(config, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    run = Run(model, distributed.wrap(model, dist, device), model_config, tok, optimizer, scheduler, scaler,
              amp_dtype, device, dist, plan.work)
    if plan.resume_state is not None:
        _resume(run, plan.resume_state)
    dist.barrier()
    return run


def _prepare_output(config: TrainConfig, plan: Plan) -> None:
    """Clear the folder for --force (a fresh run) and write cleaning.json (rank 0)."""
    if plan.resume_state is None:
        plan.clear_output()
    elif plan.resume_state.get("step", 0) < config.steps:
        # the finished run's metrics.json would sit beside newer checkpoints if this one is stopped
        # before its end; it is written again when the run finishes
        (config.out / METRICS).unlink(missing_ok=True)
    if plan.cleaning is not None:
        config.out.mkdir(parents=True, exist_ok=True)
        write_json(config.out / CLEANING, plan.cleaning)
        if config.progress:
            print(plan.cleaning_summary, file=sys.stderr)


def _shared_tokenizer(plan: Plan, config: TrainConfig, dist: Dist) -> Tokenizer:
    """The BPE learnt on rank 0, sent to every rank (so all ranks share one vocabulary)."""
    text = plan.work.make_tokenizer(config.vocab_size).to_str() if dist.is_main else None
    return Tokenizer.from_str(dist.broadcast_text(text))


def _resume(run: Run, saved: dict[str, Any]) -> None:
    train_state.restore(saved, run.optimizer, run.scheduler, run.scaler)
    run.step = run.saved_step = int(saved["step"])
    run.losses = [float(x) for x in saved["losses"]]
    run.validation = [dict(v) for v in saved["validation"]]


def _save(config: TrainConfig, run: Run, stream: BatchStream) -> None:
    extra = {"identity": config.identity(), "config": config.as_json(), "losses": run.losses,
             "validation": run.validation, "data_position": stream.position(run.step)}
    saved = train_state.capture(run.optimizer, run.scheduler, run.scaler, run.step, extra)
    save_checkpoint(config.out, run.model, run.model_config, run.tokenizer, saved, overwrite=True,
                    generation={"max_new_tokens": run.work.max_new_tokens})
    write_tokenizer_side_files(config.out, run.model_config.max_positions)


def _amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    if not config.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)           # seeds CUDA too


def _progress_bar(config: TrainConfig, start: int, dist: Dist) -> Any:
    from tqdm import tqdm

    return tqdm(total=config.steps, initial=start, unit="step", file=sys.stderr, dynamic_ncols=True,
                disable=no_bar(config.progress and dist.is_main), desc="train" if not dist.active else f"train x{dist.world}")


def no_bar(wanted: bool) -> bool:
    """Whether to leave the progress bar out: when not wanted, and when stderr is no terminal (a CI log, `2> file`),
    where tqdm's carriage-return redraws (10 a second) would pile up as one endless line; the validation lines,
    written with the bar's `write`, still show there."""
    try:
        return not (wanted and sys.stderr.isatty())
    except (AttributeError, ValueError):   # no stderr, or a closed one
        return True
