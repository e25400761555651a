"""Every command of `deploylm` is listed by `--help` and answers its own `--help` (a meta-test:
a command added to deploylm.cli.COMMANDS without a working module fails here)."""
import errno

import pytest
from click.testing import CliRunner

from deploylm import __version__
from deploylm.cli import COMMANDS, cli


def test_group_help_lists_every_command():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0, result.output
    for name in COMMANDS:
        assert f"  {name}" in result.output, f"`deploylm --help` does not list {name}"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_command_has_help(name):
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: cli {name}") or f" {name} " in result.output.splitlines()[0]
    assert len(result.output.splitlines()) > 3  # options are documented, not an empty stub


def test_version_and_unknown_command():
    assert __version__ in CliRunner().invoke(cli, ["--version"]).output
    result = CliRunner().invoke(cli, ["no-such-command"])
    assert result.exit_code == 2 and "no-such-command" in result.output


def test_python_dash_m_runs_the_same_command_line():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "deploylm", "profiles"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("bf16")


def test_help_imports_no_torch():
    """`deploylm --help` imports every command's module for its summary line; train's (via SCHEDULES) and distill's
    imported torch, so the help took ~1.7 s instead of ~0.1 s on this machine."""
    import subprocess
    import sys

    code = ("import sys; from deploylm.cli import cli\n"
            "try: cli(['--help'])\n"
            "except SystemExit: pass\n"
            "print(sorted(m for m in ('torch', 'numpy', 'onnx', 'transformers') if m in sys.modules), file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "  distill" in out.stdout, out.stderr
    assert out.stderr.strip() == "[]", out.stderr


@pytest.mark.parametrize("args", [["profiles"], ["--help"]])
def test_output_to_a_full_device_is_one_line(args):
    """`deploylm profiles > /dev/full`: one line and exit 1, not click.echo's OSError traceback (nor a second
    error when Python flushes stdout at exit)."""
    import os
    import subprocess
    import sys

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "deploylm", *args], stdout=full, stderr=subprocess.PIPE,
                                text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr == "error: could not write the output: No space left on device\n"


def test_no_option_uses_click_s_bare_int_or_float():
    """click's own int/float answer a bad value with its usage block; deploylm's INT/FLOAT (commands/_options.py)
    with one `error: --flag 'value': expected ...` line, as every other input error."""
    import click

    from deploylm.cli import LazyGroup

    bare = [f"{name} {param.opts[0]}" for name in COMMANDS for param in LazyGroup._load(name).params
            if type(param.type) in (click.types.IntParamType, click.types.FloatParamType)]
    assert bare == [], f"use _options.INT / FLOAT for: {', '.join(bare)}"


@pytest.mark.parametrize("args, line", [
    (["parity", "--model", "m", "--num-beams", "abc"], "error: --num-beams 'abc': expected an integer"),
    (["train", "--steps", "abc"], "error: --steps 'abc': expected an integer"),
    (["train", "--lr", "fast"], "error: --lr 'fast': expected a number"),
    (["generate", "--model", "m", "--batch-size", "many", "hi"], "error: --batch-size 'many': expected an integer"),
])
def test_a_bad_number_is_one_line_naming_the_flag(args, line):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and result.output == line + "\n", result.output


def test_every_option_has_help_and_paths_have_the_same_metavar():
    """`deploylm serve --help` listed --port, --max-prompt-tokens, --max-beams, --max-body-bytes and --log-level with
    no word of what they do, and serve's --model (train's --out) as TEXT where every other command says SRC (DIR)."""
    import click

    from deploylm.cli import LazyGroup

    options = [(name, param) for name in COMMANDS for param in LazyGroup._load(name).params
               if isinstance(param, click.Option) and not param.hidden]
    assert [f"{name} {param.opts[0]}" for name, param in options if not param.help] == []
    metavars = {"--model": "SRC", "--teacher": "SRC", "--reference": "SRC"}
    wrong = [f"{name} {param.opts[0]} {param.metavar}" for name, param in options
             if param.opts[0] in metavars and not param.is_flag and param.metavar != metavars[param.opts[0]]]
    assert wrong == []
    assert [f"{name} --out" for name, param in options if param.opts[0] == "--out" and param.metavar is None] == []


@pytest.mark.parametrize("args, line", [
    (["generate", "--model", "m", "--threads", "0", "hi"], "error: Invalid value for '--threads': 0 is not in the range x>=1."),
    (["serve", "--model", "m", "--port", "99999"], "error: Invalid value for '--port': 99999 is not in the range 0<=x<=65535."),
    (["train", "--arch", "rnn"], "error: Invalid value for '--arch': 'rnn' is not one of 'seq2seq', 'decoder'."),
    (["parity"], "error: Missing option '--model'."),
    (["info"], "error: Missing argument 'SRC'."),
    (["generate", "--bogus"], "error: No such option '--bogus'."),
    (["no-such-command"], "error: No such command 'no-such-command'."),
])
def test_click_s_own_usage_errors_are_one_line_too(args, line):
    """DESIGN.md 2: errors are one line on stderr, exit 2. click's own checks (IntRange, Choice, required options,
    unknown flags) printed its four-line usage block with `Error: ...` instead."""
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and result.stdout == "" and result.stderr == line + "\n", result.output


def test_ctrl_c_exits_130_not_1_which_is_a_failed_check(monkeypatch):
    """click turns Ctrl-C into "Aborted!" and exit status 1, deploylm's status for a failed parity or quality
    check; it is 130 (128 + SIGINT), as SIGTERM's is 143."""
    import deploylm.profiles

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(deploylm.profiles, "builtin_profiles", interrupted)
    result = CliRunner().invoke(cli, ["profiles"])
    assert result.exit_code == 130 and result.stderr.strip() == "Aborted!", result.output


def test_export_help_names_every_builtin_profile():
    """`deploylm export --help` said "Built-in profile name or a TOML file." without naming one, nor where the
    names are listed: a user choosing a profile had to find docs/profiles.md or guess `deploylm profiles`."""
    from deploylm.profiles import builtin_names

    result = CliRunner().invoke(cli, ["export", "--help"], terminal_width=1000)
    assert result.exit_code == 0, result.output
    assert builtin_names() and all(name in result.output for name in builtin_names()), result.output
    assert "deploylm profiles" in result.output


@pytest.mark.parametrize("error", [OSError(errno.ENAMETOOLONG, "File name too long"), RuntimeError("recursion went wrong")])
def test_errors_that_name_no_path_given_stay_tracebacks(monkeypatch, error):
    """Only a path the system refuses (ENAMETOOLONG/ELOOP with its file name, or pathlib's "Symlink loop from")
    becomes the one line "error: PATH: ...: expected a usable path"; the same errno without a file name, or any
    other RuntimeError, is no bad input of the user's and stays a traceback (not "error: None: ...")."""
    import deploylm.profiles

    def fails():
        raise error

    monkeypatch.setattr(deploylm.profiles, "builtin_profiles", fails)
    result = CliRunner().invoke(cli, ["profiles"])
    assert result.exception is error and "expected a usable path" not in result.output, result.output


def test_a_command_whose_module_misses_a_dependency_fails_loudly_not_as_an_unknown_command(monkeypatch):
    """A command module not built yet is left out of the list; one that exists but imports a library that is not
    installed is a ModuleNotFoundError naming that library, not a command that silently vanishes ("No such
    command")."""
    import importlib

    import deploylm.cli

    real = importlib.import_module

    def import_module(name, *args):
        if name == "deploylm.commands.ghost":
            raise ModuleNotFoundError("No module named 'deploylm.commands.ghost'", name=name)
        if name == "deploylm.commands.needs_lib":
            raise ModuleNotFoundError("No module named 'some_missing_lib'", name="some_missing_lib")
        return real(name, *args)

    monkeypatch.setattr(deploylm.cli.importlib, "import_module", import_module)
    monkeypatch.setitem(COMMANDS, "ghost", "ghost")
    assert "ghost" not in CliRunner().invoke(cli, ["--help"]).output
    monkeypatch.setitem(COMMANDS, "needs-lib", "needs_lib")
    result = CliRunner().invoke(cli, ["needs-lib"])
    assert isinstance(result.exception, ModuleNotFoundError) and result.exception.name == "some_missing_lib", result.output


def test_a_full_disk_under_a_file_deploylm_names_stays_its_own_error(monkeypatch):
    """main() turns ENOSPC/EDQUOT into "could not write the output" only for the output it prints (no file name);
    a write of a named file that fails so says so where it is written, and is not misreported as the output."""
    import sys

    import deploylm.cli
    import deploylm.profiles

    error = OSError(errno.ENOSPC, "No space left on device", "/some/file.json")

    def fails():
        raise error

    monkeypatch.setattr(deploylm.profiles, "builtin_profiles", fails)
    monkeypatch.setattr(sys, "argv", ["deploylm", "profiles"])
    monkeypatch.setattr(deploylm.cli, "exit_on_sigterm", lambda: None)
    with pytest.raises(OSError) as raised:
        deploylm.cli.main()
    assert raised.value is error


@pytest.mark.parametrize("args", [["-h"], ["generate", "-h"]])
def test_dash_h_is_help_too(args):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0 and result.output.startswith("Usage: "), result.output


def test_a_symlink_loop_the_system_reports_is_one_line_naming_the_path(monkeypatch):
    """ELOOP with its file name (open() of a looping link) is bad input, as a name too long is: one line, exit 2."""
    import deploylm.profiles

    def loops():
        raise OSError(errno.ELOOP, "Too many levels of symbolic links", "/tmp/loop/x")

    monkeypatch.setattr(deploylm.profiles, "builtin_profiles", loops)
    result = CliRunner().invoke(cli, ["profiles"])
    assert (result.exit_code, result.output) == (
        2, "error: /tmp/loop/x: Too many levels of symbolic links: expected a usable path\n")
