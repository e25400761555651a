"""Errors users see. Each carries one readable line; the CLI prints it and exits with `exit_code`."""
from __future__ import annotations

import re


class DeployLMError(Exception):
    """Base for every error deploylm raises on purpose. `str(err)` is one line for the user."""

    exit_code = 2


class UsageError(DeployLMError):
    """Bad input: an option, a file, a model folder, a profile. Exit status 2."""

    exit_code = 2


class ArtifactError(DeployLMError):
    """An artifact that is missing files, corrupted, or built for another machine. Exit status 2."""

    exit_code = 2


class MissingDependencyError(DeployLMError):
    """An optional library or hardware is absent; the message says how to install it. Exit status 2."""

    exit_code = 2


class CheckFailed(DeployLMError):
    """A parity or quality check ran and failed. Exit status 1."""

    exit_code = 1


class Interrupted(DeployLMError):
    """A decode stopped before its end because its caller asked (a server shutting down). Exit status 1."""

    exit_code = 1


class TrainingDiverged(DeployLMError):
    """The training loss became NaN or infinite: the weights are unusable, nothing more is saved. Exit status 1."""

    exit_code = 1


class CheckpointWriteFailed(DeployLMError):
    """A checkpoint could not be written (disk full, read-only folder); the previous one is kept. Exit status 1."""

    exit_code = 1


PROMPT_NUMBER = re.compile(r"(?:^|\bof )prompt (\d+)\b")   # "prompt 2 is empty", "... of prompt 2: ..."


def counted_over_all(exc: UsageError, offset: int) -> UsageError:
    """`exc` from the batch of prompts that starts after `offset` others, with its "prompt N" counted over
    all the prompts (the 10th prompt is "prompt 10", not the 2nd of its batch of 8)."""
    if not offset:
        return exc

    def renumber(match: re.Match) -> str:
        return match.group(0)[:match.start(1) - match.start(0)] + str(int(match.group(1)) + offset)

    return UsageError(PROMPT_NUMBER.sub(renumber, str(exc), count=1))
