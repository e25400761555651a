"""Exit statuses (DESIGN.md: 2 for bad usage or input, 1 for failed checks): each error class's, and the CLI
passing it on with the error's one line on stderr."""
import pytest
from click.testing import CliRunner

from deploylm import errors
from deploylm.cli import cli


@pytest.mark.parametrize("error, status", [
    (errors.UsageError, 2), (errors.ArtifactError, 2), (errors.MissingDependencyError, 2),
    (errors.CheckFailed, 1), (errors.Interrupted, 1), (errors.TrainingDiverged, 1), (errors.CheckpointWriteFailed, 1),
    (errors.WriteFailed, 1),
])
def test_each_error_exits_with_its_documented_status(error, status, monkeypatch):
    def boom():
        raise error("what went wrong")

    monkeypatch.setattr("deploylm.profiles.builtin_profiles", boom)   # `deploylm profiles` raises it
    result = CliRunner().invoke(cli, ["profiles"])
    assert (result.exit_code, result.output) == (status, "error: what went wrong\n")
