"""The training loop: `train(TrainConfig) -> TrainResult`.

Fixed pipeline: check the request (nothing written on bad input) -> data splits -> tokenizer ->
model, AdamW, schedule -> steps with periodic validation and checkpoints -> test-split metrics.
A checkpoint is the output folder itself (config.json, model.safetensors, tokenizer files,
generation_config.json, training_state.pt), replaced atomically every `checkpoint_every` steps.
"""
from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from deploylm.models.checkpoint import build_model, load_checkpoint, save_checkpoint
from deploylm.models.config import TransformerConfig, make_config
from deploylm.training import state as train_state
from deploylm.training.config import TrainConfig, TrainResult
from deploylm.training.data import Batch, BatchStream, SpecialIds, make_batch
from deploylm.training.evaluate import evaluate
from deploylm.training.outdir import Plan, plan_run, write_metrics, write_tokenizer_side_files
from deploylm.training.schedule import make_optimizer, make_scheduler
from deploylm.training.tokenizer import load_tokenizer, train_tokenizer

TOKENIZER_SAMPLE = 20_000     # training examples the BPE is learnt from (the first ones)


@dataclass
class Run:
    """The live objects of a run and the history that goes into its training state."""

    model: torch.nn.Module
    model_config: TransformerConfig
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    amp_dtype: torch.dtype | None
    device: torch.device
    ids: SpecialIds
    max_new_tokens: int
    step: int = 0
    losses: list[float] = field(default_factory=list)
    validation: list[dict[str, float]] = field(default_factory=list)


def train(config: TrainConfig, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train (or resume) the run described by `config`; `on_step(step, loss)` after every step."""
    plan = plan_run(config)                      # every check that can fail on bad input, no writes
    threads = torch.get_num_threads()
    if config.threads and config.device == "cpu":
        torch.set_num_threads(config.threads)
    try:
        return _train(config, plan, on_step)
    finally:
        torch.set_num_threads(threads)


def _train(config: TrainConfig, plan: Plan, on_step: Callable[[int, float], None] | None) -> TrainResult:
    run = _start(config, plan)
    stream = BatchStream(plan.splits.train, config.batch_size, config.seed)
    started, tokens, step_time = time.perf_counter(), 0, 0.0
    bar = _progress_bar(config, run.step)
    try:
        while run.step < config.steps:
            tick = time.perf_counter()
            batch = make_batch(run.tokenizer, stream.examples_at(run.step), run.ids, run.model_config.max_positions)
            loss = _train_step(run, batch.to(run.device), config)
            step_time += time.perf_counter() - tick
            run.step += 1
            run.losses.append(loss)
            tokens += batch.n_tokens
            _after_step(config, plan, run, stream, bar, tokens / step_time)
            if on_step is not None:
                on_step(run.step, loss)
    finally:
        bar.close()
    test = evaluate(run.model, run.tokenizer, plan.splits.test, run.ids, run.device,
                    run.model_config.max_positions, run.max_new_tokens)
    wall = time.perf_counter() - started
    result = TrainResult(config.out, run.step, test.as_dict(), test.examples, run.losses, run.validation,
                         wall, tokens / step_time if step_time > 0 else 0.0)
    write_metrics(config, result)
    return result


def _after_step(config: TrainConfig, plan: Plan, run: Run, stream: BatchStream, bar: Any, tokens_per_s: float) -> None:
    """Progress bar, periodic validation and checkpoint after a step."""
    bar.update(1)
    if run.step % 10 == 0 or run.step == config.steps:
        bar.set_postfix(loss=f"{run.losses[-1]:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
    last = run.step == config.steps
    if run.step % config.eval_every == 0 or last:
        res = evaluate(run.model, run.tokenizer, plan.splits.validation[:config.eval_examples], run.ids,
                       run.device, run.model_config.max_positions, run.max_new_tokens)
        run.validation.append({"step": run.step, **res.as_dict()})
        if config.progress:
            bar.write(f"step {run.step}: validation loss {res.loss:.3f}  perplexity {res.perplexity:.2f}  "
                      f"exact match {res.exact_match:.1%}  BLEU {res.bleu:.1f}", file=sys.stderr)
    if run.step % config.checkpoint_every == 0 or last:
        _save(config, run, stream)


def _train_step(run: Run, batch: Batch, config: TrainConfig) -> float:
    """One optimizer step on `batch`; returns its label-smoothed loss."""
    run.model.train()
    with torch.autocast(run.device.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None):
        logits = run.model(batch.src_ids, batch.src_mask, batch.tgt_in)          # [B, T, V]
    loss = F.cross_entropy(logits.float().flatten(0, 1), batch.labels.flatten(),  # pad labels are -100
                           ignore_index=-100, label_smoothing=config.label_smoothing)
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
    return float(loss.detach())


def _start(config: TrainConfig, plan: Plan) -> Run:
    """Fresh or resumed run objects; the only place that writes before the first checkpoint."""
    _seed_everything(config.seed)
    device = torch.device(config.device)
    if plan.resume_state is not None:
        tok = load_tokenizer(config.out)
        model, model_config = load_checkpoint(config.out, device)
    else:
        plan.clear_output()
        sample = plan.splits.train[:TOKENIZER_SAMPLE]
        tok = train_tokenizer([text for ex in sample for text in (ex.source, ex.target)], config.vocab_size)
        model_config = make_config(config.size, tok.get_vocab_size())
        model = build_model(model_config).to(device)
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    scheduler = make_scheduler(optimizer, config.warmup, config.steps, config.schedule)
    amp_dtype = _amp_dtype(config, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    ids = SpecialIds(model_config.pad_token_id, model_config.decoder_start_token_id, model_config.eos_token_id)
    run = Run(model, model_config, tok, optimizer, scheduler, scaler, amp_dtype, device, ids,
              _max_new_tokens(tok, plan, model_config))
    if plan.resume_state is not None:
        _resume(run, plan.resume_state)
    return run


def _resume(run: Run, saved: dict[str, Any]) -> None:
    train_state.restore(saved, run.optimizer, run.scheduler, run.scaler)
    run.step = int(saved["step"])
    run.losses = [float(x) for x in saved["losses"]]
    run.validation = [dict(v) for v in saved["validation"]]


def _save(config: TrainConfig, run: Run, stream: BatchStream) -> None:
    extra = {"identity": config.identity(), "config": config.as_json(), "losses": run.losses,
             "validation": run.validation, "data_position": stream.position(run.step)}
    saved = train_state.capture(run.optimizer, run.scheduler, run.scaler, run.step, extra)
    save_checkpoint(config.out, run.model, run.model_config, run.tokenizer, saved, overwrite=True,
                    generation={"max_new_tokens": run.max_new_tokens})
    write_tokenizer_side_files(config.out, run.model_config.max_positions)


def _max_new_tokens(tok: Any, plan: Plan, model_config: TransformerConfig) -> int:
    """Decoding budget: twice the longest target among the first training examples, plus 8."""
    sample = [ex.target for ex in plan.splits.train[:2000]]
    longest = max(len(enc.ids) for enc in tok.encode_batch(sample, add_special_tokens=False))
    return min(model_config.max_positions - 1, 2 * longest + 8)


def _amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    if not config.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)           # seeds CUDA too


def _progress_bar(config: TrainConfig, start: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=config.steps, initial=start, unit="step", file=sys.stderr, dynamic_ncols=True,
                disable=not config.progress, desc="train")
