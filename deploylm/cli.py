"""`deploylm` command line: a click group; each command is a thin shell in deploylm/commands/.

Errors deploylm raises on purpose (DeployLMError), and click's usage errors, become one line on stderr, options named by their flags, and
their exit code (2 for bad input, 1 for failed checks and a machine that failed: a full disk, docs/reliability.md), and so do paths the system refuses outright (a file name too long, a
symlink loop), and output the terminal side cannot take (`> /dev/full`, a full disk behind a redirect: exit 1);
nothing else is caught, so real bugs still show a traceback.
"""
from __future__ import annotations

import ast
import errno
import importlib
import os
import signal
import sys

import click

from deploylm import __version__
from deploylm.errors import DeployLMError, OptionError

# command name -> module in deploylm.commands exposing `command` (a click.Command)
COMMANDS = {
    "train": "train",
    "distill": "distill",
    "export": "export",
    "generate": "generate",
    "parity": "parity",
    "bench": "bench",
    "info": "info",
    "profiles": "profiles",
    "serve": "serve",
    "attention": "attention",
}


class LazyGroup(click.Group):
    """Imports a command's module only when that command (or `--help`) needs it."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if self._load(name) is not None]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return self._load(name) if name in COMMANDS else None

    @staticmethod
    def _load(name: str) -> click.Command | None:
        try:
            module = importlib.import_module(f"deploylm.commands.{COMMANDS[name]}")
        except ModuleNotFoundError as exc:
            if exc.name == f"deploylm.commands.{COMMANDS[name]}":
                return None  # command not built yet
            raise
        return module.command

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DeployLMError as exc:
            click.echo(f"error: {self._message(ctx, exc)}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            # Ctrl-C: click's "Aborted!", but with status 130 (128 + SIGINT, as SIGTERM's is 143), not click's 1,
            # which is deploylm's "a check failed" (parity, quality): a script could not tell the two apart
            click.echo("\nAborted!", err=True)
            ctx.exit(128 + signal.SIGINT)
        except click.UsageError as exc:
            # click's own (an unknown command or option, a missing option, a value outside a Choice or range):
            # one line as well, not its usage block of four
            click.echo(f"error: {exc.format_message()}", err=True)
            ctx.exit(exc.exit_code)
        except OSError as exc:
            # a path the user gave that the system refuses outright (a name over 255 bytes, a symlink loop) is
            # bad input wherever it is first touched; other OS errors stay tracebacks
            if exc.errno not in PATH_ERRNOS or not exc.filename:
                raise
            click.echo(f"error: {exc.filename}: {exc.strerror}: expected a usable path", err=True)
            ctx.exit(2)
        except RuntimeError as exc:
            # Path.resolve() before Python 3.13 reports a symlink loop as RuntimeError("Symlink loop from '<path>'"),
            # not as OSError ELOOP: the same bad input (`train --out loop/run`), the same one line
            path = symlink_loop(exc)
            if path is None:
                raise
            click.echo(f"error: {path}: {os.strerror(errno.ELOOP)}: expected a usable path", err=True)
            ctx.exit(2)

    def _message(self, ctx: click.Context, exc: DeployLMError) -> str:
        """An OptionError names options by their Python keyword (num_beams): on the command line, by the flags of
        the command that ran (--num-beams)."""
        command = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
        if not isinstance(exc, OptionError) or command is None:
            return str(exc)
        flags = {param.name: flag for param in command.params if isinstance(param, click.Option) and param.name
                 for flag in param.opts[:1] if flag.startswith("--")}
        return exc.with_flags(flags)


PATH_ERRNOS = (errno.ENAMETOOLONG, errno.ELOOP)


def symlink_loop(exc: RuntimeError) -> str | None:
    """The path of pathlib's RuntimeError("Symlink loop from '<path>'") (Python < 3.13); None for any other."""
    prefix = "Symlink loop from "
    text = str(exc)
    if not text.startswith(prefix):
        return None
    try:
        path = ast.literal_eval(text[len(prefix):])
    except (ValueError, SyntaxError):
        return None
    return path if isinstance(path, str) else None


FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _drop_stdout() -> None:
    """Point stdout at /dev/null: what its buffer still holds would fail again when Python flushes it at exit."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):   # not a real file (CliRunner's capture)
        return
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    os.close(null)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deploylm")
def cli() -> None:
    """Train, export, quantize, verify and run Transformer language models with one decoder."""


def main() -> None:
    """Console entry point (`deploylm`)."""
    exit_on_sigterm()
    try:
        cli(prog_name="deploylm")
    except OSError as exc:
        if exc.errno not in FULL_ERRNOS or exc.filename:
            raise
        # the output a command prints (`generate > /dev/full`, a full disk behind a redirect); the files deploylm
        # writes itself say so with their names where they are written
        _drop_stdout()
        click.echo(f"error: could not write the output: {exc.strerror}", err=True)
        sys.exit(1)


def exit_on_sigterm() -> None:
    """SIGTERM (plain `kill`, a CI timeout, `docker stop`) exits through Python's own unwinding, as
    Ctrl-C does, so the cleanup of half-written outputs runs (temporary folders are removed) instead
    of the process vanishing mid-write. Exit status 143, as for a process killed by SIGTERM. A handler
    someone else set (or SIG_IGN) is left alone; `serve` installs uvicorn's own graceful shutdown."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    main()
