"""`deploylm profiles`: the built-in profiles with one-line descriptions."""
from __future__ import annotations

import click


@click.command(name="profiles")
def command() -> None:
    """List the built-in profiles (pass a NAME or your own FILE.toml to --profile)."""
    from deploylm.profiles import builtin_profiles

    profiles = builtin_profiles()
    width = max(len(p.name) for p in profiles)
    for p in profiles:
        click.echo(f"{p.name:<{width}}  {p.precision:<5}  {','.join(p.backends):<10}  {p.description}")
