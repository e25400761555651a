"""`deploylm distill`: distil a teacher into a student with fewer layers (docs/distillation.md)."""
from __future__ import annotations

import click

from deploylm.commands._options import FLOAT, INT, quiet_transformers
from deploylm.errors import UsageError
from deploylm.training.distill import DistillConfig

D = DistillConfig  # defaults shown in --help come from the library


@click.command(name="distill")
@click.option("--teacher", metavar="SRC", help="deploylm checkpoint or Hugging Face causal LM folder. Required.")
@click.option("--out", metavar="DIR", help="Folder for the student (a checkpoint or HF folder). Required.")
@click.option("--layers", type=INT, default=None, help="Layers per stack of the student. Default: half the teacher's.")
@click.option("--d-model", type=INT, default=None, help="Student width (deploylm checkpoints; other width = random init).")
@click.option("--temperature", type=FLOAT, default=D.temperature, show_default=True, help="Softmax temperature T of the soft targets.")
@click.option("--alpha", type=FLOAT, default=D.alpha, show_default=True, help="Weight of the KD term; 1 - alpha weighs the hard-label CE.")
@click.option("--steps", type=INT, default=D.steps, show_default=True, help="Optimizer steps.")
@click.option("--task", help="Built-in task: digits2words or reverse (encoder-decoder teachers), stories (deploylm "
                             "decoder-only teachers). Default: the teacher's own.")
@click.option("--data", metavar="FILE", help=".jsonl pairs (encoder-decoder), or text (causal LM: a plain text file; "
                                             "for a deploylm decoder-only teacher also .jsonl of {\"text\"} lines).")
@click.option("--block-size", type=INT, default=None,
              help="Causal LMs: tokens per text block. Default: a deploylm teacher's training --block-size, else 128.")
@click.option("--batch-size", type=INT, default=D.batch_size, show_default=True, help="Examples (or text blocks) per step.")
@click.option("--lr", type=FLOAT, default=None,
              help="Peak learning rate (cosine decay). Default: 5e-4 for a student made of the teacher's layers, "
                   "1e-3 for one of another --d-model (random init).")
@click.option("--eval-examples", type=INT, default=D.eval_examples, show_default=True, help="Encoder-decoder teachers: test examples decoded by teacher and student (causal LMs: every held-out block).")
@click.option("--seed", type=INT, default=D.seed, show_default=True, help="Seed for batches, init and dropout.")
@click.option("--device", default=D.device, show_default=True, help="cpu or cuda.")
@click.option("--threads", type=INT, default=D.threads, show_default=True, help="CPU threads for PyTorch (0: its default).")
@click.option("--force", is_flag=True, help="Replace an existing model folder at --out.")
def command(teacher, out, **options) -> None:
    """Train a smaller student on the teacher's soft targets and save it as an ordinary model."""
    if not teacher:
        raise UsageError("--teacher SRC is required: a deploylm checkpoint or Hugging Face causal LM folder")
    if not out:
        raise UsageError("--out DIR is required: the folder the student is written to")
    config = DistillConfig(teacher=teacher, out=out, **options)
    from deploylm.training.distill import distill

    quiet_transformers()                  # no weight-loading bars; distill shows its own progress
    result = distill(config)
    first, last = result.losses[0], result.losses[-1]
    click.echo(f"student: {result.out}  ({result.parameters['student']:,} of the teacher's {result.parameters['teacher']:,} "
               f"parameters; layers {result.kept_layers}, init {result.init})")
    click.echo(f"loss: kd {first['kd']:.3f} -> {last['kd']:.3f}  ce {first['ce']:.3f} -> {last['ce']:.3f}  ({result.steps} steps)")
    for name, metrics in (("teacher", result.teacher), ("student", result.student)):
        click.echo(f"{name}: " + "  ".join(f"{key} {value:.4g}" for key, value in metrics.items()))
