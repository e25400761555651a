"""`deploylm bench`: the standard workload over models × backends, against transformers.generate."""
from __future__ import annotations

import click

from deploylm.commands._options import INT
from deploylm.errors import UsageError


@click.command(name="bench")
@click.option("--model", "models", multiple=True, metavar="SRC", help="Model or artifact; repeat to compare several.")
@click.option("--backends", default="torch,onnx", show_default=True,
              help="Each model runs on every listed backend that can open it (artifacts: their profile's, onnx or trt; "
              "others: torch).")
@click.option("--prompts", "prompts_file", metavar="FILE", help="Prompts, one per line. Default: the 8 standard prompts.")
@click.option("--batch-size", type=INT, default=8, show_default=True, help="Prompts per call.")
@click.option("--num-beams", type=INT, default=4, show_default=True, help="Beams (1 = greedy).")
@click.option("--max-new-tokens", type=INT, default=64, show_default=True, help="Exactly this many new tokens per prompt.")
@click.option("--rounds", type=INT, default=3, show_default=True, help="Timed rounds per row (median reported).")
@click.option("--warmup", type=INT, default=1, show_default=True, help="Untimed rounds per row first.")
@click.option("--threads", type=INT, default=2, show_default=True, help="torch and ONNX Runtime intra-op threads.")
@click.option("--spin", type=click.Choice(["off", "on", "both"]), default="off", show_default=True,
              help="onnx rows: ONNX Runtime's threads spin between kernels (on), sleep (off), or one row of each (both).")
@click.option("--reference/--no-reference", default=True, show_default=True,
              help="Run transformers.generate on each original model as the ratio reference.")
@click.option("--in-process", is_flag=True, help="Run every row in this process (no per-row peak RSS).")
@click.option("--json", "json_file", metavar="FILE", help="Write the full report as JSON ('-': to stdout, which "
              "then holds only it; the table goes to stderr).")
@click.option("--plot", "plot_file", metavar="FILE.png", help="Draw tokens/s bars per row (needs matplotlib).")
def command(models, backends, prompts_file, batch_size, num_beams, max_new_tokens, rounds, warmup, threads,
            spin, reference, in_process, json_file, plot_file) -> None:
    """Time generation (EOS banned until --max-new-tokens, so every run has the same length) for
    each model × backend and transformers.generate, interleaved; print tokens/s, latency, time to
    first token, decoder overhead, peak RSS and token agreement."""
    from deploylm.bench import BenchConfig, plot_report, run_bench
    from deploylm.benchmarking.table import check_plot_path
    from deploylm.fsutil import check_output_file
    from deploylm.parity import read_prompts_file

    names = tuple(n.strip() for n in backends.split(",") if n.strip())
    if not names:
        raise UsageError(f"--backends {backends!r}: expected a comma-separated list of backends, e.g. torch,onnx")
    extra = {"prompts": tuple(read_prompts_file(prompts_file))} if prompts_file is not None else {}
    config = BenchConfig(models=models, backends=names, batch_size=batch_size, num_beams=num_beams,
                         max_new_tokens=max_new_tokens, rounds=rounds, warmup=warmup, threads=threads,
                         spin=spin, reference=reference, isolate=not in_process, **extra)
    to_stdout = json_file == "-"   # as --input - reads stdin: not a file named "-"
    if json_file is not None and not to_stdout:     # "" too: refused, not a run that writes nothing
        check_output_file(json_file, "--json")
    if plot_file is not None:
        check_plot_path(plot_file)
    report = run_bench(config, progress=lambda line: click.echo(line, err=True))
    click.echo(report.table(), err=to_stdout)
    if to_stdout:
        click.echo(report.json_text())
    elif json_file:
        click.echo(f"wrote {report.write_json(json_file)}", err=True)
    if plot_file:
        click.echo(f"wrote {plot_report(report, plot_file)}", err=True)
