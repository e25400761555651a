"""`deploylm train`: train the seed Transformer on a built-in task or a .jsonl file, or the decoder-only
LM on text; in one process or data-parallel (`--nproc N`, torchrun underneath)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from deploylm.commands._options import FLOAT, INT
from deploylm.errors import UsageError
from deploylm.training.clean import LENGTH_UNITS, CleanOptions
from deploylm.training.config import ARCHS, TrainConfig, TrainResult

D = TrainConfig  # defaults shown in --help come from the library's TrainConfig
C = CleanOptions
LAUNCH_OPTIONS = ("nproc", "nnodes", "node_rank", "master_addr", "master_port")


@click.command(name="train")
@click.option("--task", help="Built-in task: digits2words or reverse (seq2seq); stories (--arch decoder).")
@click.option("--data", help="A .jsonl file of {\"source\", \"target\"} lines; with --arch decoder a text file "
                             "(paragraphs separated by blank lines) or .jsonl of {\"text\"} lines.")
@click.option("--out", metavar="DIR", help="Output folder (the checkpoint). Required.")
@click.option("--arch", type=click.Choice(ARCHS), default=D.arch, show_default=True,
              help="seq2seq: encoder-decoder on pairs; decoder: decoder-only LM on text.")
@click.option("--size", default=D.size, show_default=True, help="Model size: tiny, small or base.")
@click.option("--steps", type=INT, default=D.steps, show_default=True, help="Optimizer steps in total.")
@click.option("--batch-size", type=INT, default=D.batch_size, show_default=True,
              help="Examples (LM: sequences) per step: the GLOBAL batch, split across --nproc processes.")
@click.option("--lr", type=FLOAT, default=D.lr, show_default=True, help="Peak learning rate (after warmup).")
@click.option("--warmup", type=INT, default=D.warmup, show_default=True, help="Linear warmup steps.")
@click.option("--dropout", type=FLOAT, default=None, help="Dropout (default: the size preset's, 0.1).")
@click.option("--seed", type=INT, default=D.seed, show_default=True, help="Seed for data, init and dropout.")
@click.option("--eval-every", type=INT, default=D.eval_every, show_default=True, help="Validate every N steps.")
@click.option("--checkpoint-every", type=INT, default=D.checkpoint_every, show_default=True,
              help="Save a checkpoint (what --resume continues) every N steps, and at the end.")
@click.option("--block-size", type=INT, default=None, help=f"Decoder: tokens per sequence (default: {D.block_size}).")
@click.option("--stride", type=INT, default=None, help="Decoder: tokens between sequence starts (default: --block-size).")
@click.option("--ngram-order", type=INT, default=None,
              help=f"Decoder: n of the n-gram baseline reported beside the LM (0: none; default: {D.ngram_order}).")
@click.option("--clean/--no-clean", default=C.enabled, show_default=True,
              help="Clean --data: NFKC, whitespace collapse, exact dedup, length filter.")
@click.option("--min-length", type=INT, default=C.min_length, show_default=True,
              help="Cleaning: drop records with a text shorter than this (--length-unit).")
@click.option("--max-length", type=INT, default=None, help="Cleaning: drop records with a text longer than this.")
@click.option("--length-unit", type=click.Choice(LENGTH_UNITS), default=C.unit, show_default=True,
              help="Unit of --min-length/--max-length.")
@click.option("--device", default=D.device, show_default=True, help="cpu or cuda (AMP on cuda).")
@click.option("--threads", type=INT, default=D.threads, show_default=True,
              help="CPU threads for PyTorch per process (0: its default).")
@click.option("--resume", is_flag=True, help="Continue the run saved in --out.")
@click.option("--force", is_flag=True, help="Delete the run in --out and start over.")
@click.option("--nproc", type=INT, default=1, show_default=True,
              help="Data-parallel processes on this machine (torchrun; gloo on CPU, NCCL on CUDA).")
@click.option("--nnodes", type=INT, default=1, show_default=True, help="Machines in the run (passed to torchrun).")
@click.option("--node-rank", type=INT, default=0, show_default=True, help="This machine's rank (torchrun).")
@click.option("--master-addr", default=None, help="Address of the rank-0 machine (torchrun).")
@click.option("--master-port", type=INT, default=29500, show_default=True, help="Its port (torchrun).")
@click.pass_context
def command(ctx: click.Context, **opts: Any) -> None:
    """Train a model and write a checkpoint folder with test-split metrics.json."""
    from deploylm.training import distributed

    launch = distributed.Launch(**{name: opts.pop(name) for name in LAUNCH_OPTIONS})
    config = _config(opts)
    if launch.needed:
        if distributed.in_worker():
            raise UsageError("--nproc/--nnodes start torchrun: inside torchrun leave them out")
        from deploylm.fsutil import exclusive_writer

        with exclusive_writer(config.out):      # held for the workers, which do not take it themselves
            _check_before_launch(config, launch)
            distributed.launch(launch, worker_args(ctx), click.echo)
        return
    from deploylm.training.trainer import train

    result = train(config)
    if result.test:                       # rank 0 (the only rank that evaluates) reports
        if result.resumed_at is not None and result.resumed_at >= config.steps:
            click.echo(f"--resume: {config.out} is already at step {result.resumed_at} (--steps {config.steps}): "
                       "nothing to train, evaluated again; pass a larger --steps to continue it")
        for line in report_lines(result):
            click.echo(line)


def _config(opts: dict[str, Any]) -> TrainConfig:
    if not opts["out"]:
        raise UsageError("--out DIR is required: the folder the checkpoint is written to")
    decoder_only = [name for name in ("block_size", "stride", "ngram_order") if opts[name] is not None]
    if opts["arch"] != "decoder" and decoder_only:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in decoder_only)
        raise UsageError(f"{flags} {'applies' if len(decoder_only) == 1 else 'apply'} to the decoder-only LM "
                         f"(--arch decoder): the {opts['arch']} model trains on source/target pairs, not on blocks of "
                         "text")
    for name in ("block_size", "ngram_order"):      # not given: TrainConfig's defaults
        if opts[name] is None:
            del opts[name]
    clean = CleanOptions(opts.pop("clean"), opts.pop("min_length"), opts.pop("max_length"), opts.pop("length_unit"))
    return TrainConfig(**{**opts, "out": Path(opts["out"]), "data": Path(opts["data"]) if opts["data"] else None,
                          "clean": clean})


def _check_before_launch(config: TrainConfig, launch: Any) -> None:
    """The checks a worker would fail on, made once here so a bad request is one line and no processes."""
    from deploylm.training.outdir import plan_run

    if config.batch_size % launch.world:
        raise UsageError(f"--batch-size {config.batch_size} (the global batch): expected a multiple of the "
                         f"{launch.world} processes (--nproc x --nnodes)")
    plan_run(config)


def worker_args(ctx: click.Context) -> list[str]:
    """This command's options as given, without the launcher's: what each torchrun worker receives."""
    args: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if not isinstance(param, click.Option) or param.name in LAUNCH_OPTIONS or value is None:
            continue
        if param.is_flag and param.secondary_opts:
            args.append(param.opts[0] if value else param.secondary_opts[0])
        elif param.is_flag:
            args += [param.opts[0]] if value else []
        else:
            args += [param.opts[0], str(value)]
    return args


def report_lines(result: TrainResult) -> list[str]:
    """What the command prints after a run: test metrics (and baseline), cleaning, examples, where."""
    test = result.test
    if result.arch == "decoder":
        lines = [f"test: perplexity {test['perplexity']:.2f}  (loss {test['loss']:.3f} on {test['tokens']:.0f} "
                 f"held-out tokens, {result.steps} steps)"]
        if result.baseline:
            b = result.baseline
            verdict = "the neural LM is better" if test["perplexity"] < b["perplexity"] else "the n-gram is still better"
            lines.append(f"baseline: {b['model']} perplexity {b['perplexity']:.2f} on the same tokens ({verdict})")
    else:
        lines = [f"test: exact match {test['exact_match']:.1%}  BLEU {test['bleu']:.1f}  "
                 f"loss {test['loss']:.3f}  perplexity {test['perplexity']:.2f}  ({result.steps} steps)"]
    if result.world_size > 1:
        lines.append(f"trained data-parallel on {result.world_size} processes")
    if result.cleaning is not None:
        from deploylm.training.clean import CleanOptions, CleanReport

        c = result.cleaning
        lines.append(CleanReport(CleanOptions(**c["options"]), c["records_in"], c["kept"], c["normalized"],
                                 c["dropped"]).summary())
    lines += [f"  {source!r} -> {generated!r}  (reference {reference!r})" for source, generated, reference in result.examples]
    return lines + [f"checkpoint: {result.out}  (metrics in {result.out / 'metrics.json'})"]
