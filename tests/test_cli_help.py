"""Every command of `deploylm` is listed by `--help` and answers its own `--help` (a meta-test:
a command added to deploylm.cli.COMMANDS without a working module fails here)."""
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
