"""Errors users see. Each carries one readable line; the CLI prints it and exits with `exit_code`."""
from __future__ import annotations

import re
from typing import Callable, Mapping


class DeployLMError(Exception):
    """Base for every error deploylm raises on purpose. `str(err)` is one line for the user."""

    exit_code = 2


class UsageError(DeployLMError):
    """Bad input: an option, a file, a model folder, a profile. Exit status 2."""

    exit_code = 2


class OptionError(UsageError):
    """A bad option value (or combination) of a call, named as the Python API takes it: `num_beams=0`. The CLI,
    where the user typed flags, prints `with_flags(...)` instead: `--num-beams 0`. `option`: the keyword it is about."""

    def __init__(self, message: str, option: str = "") -> None:
        super().__init__(message)
        self.option = option

    def with_flags(self, flags: Mapping[str, str]) -> str:
        """The message with the options in `flags` (keyword -> flag, num_beams -> --num-beams) written as flags:
        `num_beams=2` as `--num-beams 2`; a bare keyword as its flag when it has an underscore (a plain word
        such as "temperature" in the prose stays), and the option this error is about where it opens the
        message without `=` ("truncation 'middle': ...")."""
        text = str(self)
        for name, flag in flags.items():
            text = re.sub(rf"(?<![\w-]){re.escape(name)}=", f"{flag} ", text)
            if "_" in name:
                text = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", flag, text)
        flag = flags.get(self.option)
        if flag and flag not in text:
            text = re.sub(rf"(?<![\w-]){re.escape(self.option)}(?![\w-])", flag, text, count=1)
        return text


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


class NumericalOverflow(DeployLMError):
    """The model's logits came out NaN or infinite while decoding (a float16 overflow, usually): the model's fault,
    not the call's options (a server answers 500). Exit status 1."""

    exit_code = 1


class TrainingDiverged(DeployLMError):
    """The training loss became NaN or infinite: the weights are unusable, nothing more is saved. Exit status 1."""

    exit_code = 1


class WriteFailed(DeployLMError):
    """An output could not be written (a full disk or quota, a folder made read-only during the run): the machine,
    not the input, is at fault, so it is not a usage error. Exit status 1, in every command."""

    exit_code = 1


class CheckpointWriteFailed(WriteFailed):
    """A checkpoint could not be written (disk full, read-only folder); the previous one is kept. Exit status 1."""

    exit_code = 1


PROMPT_NUMBER = re.compile(r"(?:^|\bof )prompt (\d+)\b")   # "prompt 2 is empty", "... of prompt 2: ..."


def counted_over_all(exc: UsageError, offset: int) -> UsageError:
    """`exc` from the batch of prompts that starts after `offset` others, with its "prompt N" counted over
    all the prompts (the 10th prompt is "prompt 10", not the 2nd of its batch of 8)."""
    if not offset:
        return exc
    return UsageError(str(renumbered(exc, lambda n: n + offset)))


def renumbered(exc: UsageError, number: Callable[[int], int | None]) -> UsageError:
    """`exc` with its first "prompt N" (N counted within one call) as "prompt number(N)"; `exc` itself where
    it names no prompt, or `number` gives None."""
    def renumber(match: re.Match) -> str:
        new = number(int(match.group(1)))
        return match.group(0) if new is None else match.group(0)[:match.start(1) - match.start(0)] + str(new)

    message = PROMPT_NUMBER.sub(renumber, str(exc), count=1)
    return exc if message == str(exc) else UsageError(message)
