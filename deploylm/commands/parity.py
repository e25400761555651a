"""`deploylm parity`: compare backends step by step on the same prompts; exit 1 outside tolerance."""
from __future__ import annotations

import json

import click

from deploylm.commands._options import INT, quiet_transformers
from deploylm.errors import CheckFailed, UsageError


@click.command(name="parity")
@click.option("--model", "src", required=True, metavar="SRC",
              help="An artifact: the onnx/trt backends run it, the torch backend the model it was exported from "
                   "(see --reference). A checkpoint, Hugging Face folder or .gguf file is first exported with "
                   "--profile (default fp32) into a temporary folder, which is removed afterwards.")
@click.option("--backends", default="torch,onnx", show_default=True, help="Comma-separated; the first is the reference.")
@click.option("--prompts", "prompts_file", metavar="FILE", help="Prompts, one per line. Default: a few built-in prompts.")
@click.option("--profile", "profile_name", metavar="NAME|FILE.toml",
              help="Tolerances and decoding defaults. Default: the artifact's profile, else fp32.")
@click.option("--num-beams", type=INT, default=None, help="Override the profile's num_beams.")
@click.option("--max-new-tokens", type=INT, default=None, help="Override the profile's max_new_tokens.")
@click.option("--reference", metavar="SRC", default=None,
              help="For an artifact: the model it was exported from, which the torch backend opens. "
                   "Default: the path its manifest records (give this when that model moved).")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
def command(src, backends, prompts_file, profile_name, num_beams, max_new_tokens, reference, as_json) -> None:
    """Teacher-force the reference's tokens through every backend; report per-step |Δ logit|, top-1
    agreement, the first diverging step and whether final beams match. Exit 1 outside tolerance."""
    from deploylm.parity import read_prompts_file, run_parity
    from deploylm.profiles import load_profile

    quiet_transformers()   # no weight-loading bars around the table

    profile = load_profile(profile_name) if profile_name else None
    prompts = read_prompts_file(prompts_file) if prompts_file is not None else None   # '' is a file name too
    overrides = {k: v for k, v in (("num_beams", num_beams), ("max_new_tokens", max_new_tokens)) if v is not None}
    names = [name.strip() for name in backends.split(",") if name.strip()]

    def exporting(profile_name: str) -> None:
        click.echo(f"exporting {src} with profile {profile_name} into a temporary folder first (deploylm export "
                   "keeps one) ...", err=True)

    try:
        report = run_parity(src, names, prompts, profile, reference, on_export=exporting, **overrides)
    except UsageError as exc:   # a prompt over the window: parity has no --truncation, only shorter prompts
        from deploylm.long_inputs import prompts_flags_advice, without_truncation_advice

        message = without_truncation_advice(str(exc))
        if message == str(exc):
            raise                     # as it is: an OptionError names the command's flags when it is shown
        raise UsageError(prompts_flags_advice(message, "parity")) from None
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.table())
    failures = report.failures()
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise CheckFailed(f"parity outside tolerance: {failures[0]}{more}")
