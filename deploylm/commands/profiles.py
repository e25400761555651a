"""`deploylm profiles`: the built-in profiles with one-line descriptions, or one built-in's TOML."""
from __future__ import annotations

import click


@click.command(name="profiles")
@click.argument("name", required=False)
def command(name: str | None) -> None:
    """List the built-in profiles (pass a NAME or your own FILE.toml to --profile).

    With NAME, print that built-in's TOML file: a start for your own profile
    (`deploylm profiles int8 > my.toml`, edit, then `--profile my.toml`)."""
    from deploylm.errors import UsageError
    from deploylm.profiles import builtin_dir, builtin_names, builtin_profiles

    if name is not None:
        if name not in builtin_names():
            raise UsageError(f"NAME {name!r} is no built-in profile: expected one of {', '.join(builtin_names())}")
        click.echo((builtin_dir() / f"{name}.toml").read_text(encoding="utf-8"), nl=False)
        return
    profiles = builtin_profiles()
    width = max(len(p.name) for p in profiles)
    for p in profiles:
        click.echo(f"{p.name:<{width}}  {p.precision:<5}  {','.join(p.backends):<10}  {p.description}")
