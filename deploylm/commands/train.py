"""`deploylm train`: train the seed Transformer on a built-in task or a .jsonl file."""
from __future__ import annotations

from pathlib import Path

import click

from deploylm.errors import UsageError
from deploylm.training.config import TrainConfig

D = TrainConfig  # defaults shown in --help come from the library's TrainConfig


@click.command(name="train")
@click.option("--task", help="Built-in task: digits2words or reverse.")
@click.option("--data", help="A .jsonl file of {\"source\": ..., \"target\": ...} lines.")
@click.option("--out", help="Output folder (the checkpoint). Required.")
@click.option("--size", default=D.size, show_default=True, help="Model size: tiny, small or base.")
@click.option("--steps", type=int, default=D.steps, show_default=True, help="Optimizer steps in total.")
@click.option("--batch-size", type=int, default=D.batch_size, show_default=True, help="Examples per step.")
@click.option("--lr", type=float, default=D.lr, show_default=True, help="Peak learning rate (after warmup).")
@click.option("--seed", type=int, default=D.seed, show_default=True, help="Seed for data, init and dropout.")
@click.option("--eval-every", type=int, default=D.eval_every, show_default=True, help="Validate every N steps.")
@click.option("--device", default=D.device, show_default=True, help="cpu or cuda (AMP on cuda).")
@click.option("--threads", type=int, default=D.threads, show_default=True,
              help="CPU threads for PyTorch (0: its default).")
@click.option("--resume", is_flag=True, help="Continue the run saved in --out.")
@click.option("--force", is_flag=True, help="Delete the run in --out and start over.")
def command(task, data, out, size, steps, batch_size, lr, seed, eval_every, device, threads, resume, force) -> None:
    """Train a model and write a checkpoint folder with test-split metrics.json."""
    if not out:
        raise UsageError("--out DIR is required: the folder the checkpoint is written to")
    config = TrainConfig(out=Path(out), task=task, data=Path(data) if data else None, size=size, steps=steps,
                         batch_size=batch_size, lr=lr, seed=seed, eval_every=eval_every, device=device, threads=threads,
                         resume=resume, force=force)
    from deploylm.training.trainer import train

    result = train(config)
    test = result.test
    click.echo(f"test: exact match {test['exact_match']:.1%}  BLEU {test['bleu']:.1f}  "
               f"loss {test['loss']:.3f}  perplexity {test['perplexity']:.2f}  ({result.steps} steps)")
    for source, generated, reference in result.examples:
        click.echo(f"  {source!r} -> {generated!r}  (reference {reference!r})")
    click.echo(f"checkpoint: {result.out}  (metrics in {result.out / 'metrics.json'})")
