"""`deploylm export`: SRC + profile -> a verified artifact folder (DESIGN.md §2, §6)."""
from __future__ import annotations

import click

from deploylm.commands._options import quiet_transformers
from deploylm.errors import UsageError
from deploylm.profiles import builtin_names


@click.command(name="export")
@click.option("--model", "src", metavar="SRC", help="Checkpoint, Hugging Face folder or .gguf file. Required.")
@click.option("--profile", default="fp32", show_default=True, metavar="NAME|FILE.toml",
              help=f"Built-in profile ({', '.join(builtin_names())}; `deploylm profiles` describes them) or a TOML file.")
@click.option("--out", "out_dir", metavar="DIR", default=None, help="Output folder. Default: export/<model>-<profile>.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--calibration", metavar="FILE", default=None, help="Text for static int8 calibration (one sample a line).")
@click.option("--allow-quality-loss", is_flag=True, help="Write the artifact even when the profile's [quality] budget is not met.")
def command(src: str | None, profile: str, out_dir: str | None, force: bool, calibration: str | None,
            allow_quality_loss: bool) -> None:
    """Export SRC to ONNX, validate the graphs against PyTorch, check parity, write the artifact."""
    if not src:
        raise UsageError("--model SRC is required: a checkpoint, Hugging Face folder or .gguf file")
    if out_dir == "":   # an unset variable in --out "$DIR": not the current folder '.'
        raise UsageError("--out '': expected a folder name (leave --out out for export/<model>-<profile>)")
    from deploylm.export.pipeline import export_model

    quiet_transformers()   # no weight-loading bars around export's own lines
    report = export_model(src, profile, out_dir, force=force, calibration=calibration,
                          allow_quality_loss=allow_quality_loss)
    for line in report.lines():
        click.echo(line)
