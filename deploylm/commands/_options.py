"""Option bundles shared by the commands that generate (generate, serve, bench, parity).

`@decoding_options` adds the DecodingOptions flags (DESIGN.md §2); every flag defaults to "not given"
so the model's own defaults apply, and `given_options(kwargs)` pops them back out as the dict of
flags the user actually typed. `@input_options` adds --truncation and --window-overlap (what to do with
prompts over the model's window; read with `given_input_options(kwargs)`, passed to generate/stream as
keywords of their own). `@torch_options` adds --device and --dtype. Bad values are a
UsageError: one `error: ...` line and exit status 2, like every other deploylm input error.
"""
from __future__ import annotations

import json
from typing import Any, Callable

import click

from deploylm.decoding.options import GROUP_BEAM_SEARCH_REFUSED, DecodingOptions, parse_exponential_decay
from deploylm.errors import OptionError, UsageError

D = DecodingOptions()  # the defaults shown in --help


class _Number(click.ParamType):
    """int or float; a bad value raises UsageError (one line) instead of click's usage block."""

    def __init__(self, kind: type) -> None:
        self.kind = kind
        self.name = kind.__name__

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, self.kind) and not isinstance(value, bool):
            return value
        try:
            return self.kind(value)
        except (TypeError, ValueError):
            flag = param.opts[0] if param is not None else "option"
            kind = "an integer" if self.kind is int else "a number"
            raise UsageError(f"{flag} {value!r}: expected {kind}") from None


INT, FLOAT = _Number(int), _Number(float)


class _Parsed(click.ParamType):
    """A flag's text turned into a value by `parse`; a ValueError becomes one UsageError line naming the
    flag and `expected(error)`."""

    def __init__(self, name: str, parse: Callable[[str], Any], expected: Callable[[ValueError], str]) -> None:
        self.name, self.parse, self.expected = name, parse, expected

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self.parse(value)
        except ValueError as exc:
            flag = param.opts[0] if param is not None else "option"
            raise UsageError(f"{flag} {value!r}: expected {self.expected(exc)}") from None


def _start_factor(text: str) -> tuple[int, float]:
    """START,FACTOR checked here, so a bad value is named as typed (8,-1), not as the API's [start, factor]."""
    start, factor = text.split(",")
    try:
        return parse_exponential_decay((int(start), float(factor)))
    except UsageError:
        raise ValueError(text) from None


# --sequence-bias '[[[10, 45], -2.0]]': JSON; --exponential-decay-length-penalty 8,1.5: (int, float)
JSON = _Parsed("json", json.loads, lambda exc: f"JSON ({exc})")
PAIR = _Parsed("pair", _start_factor, lambda exc: "START,FACTOR with START an integer >= 0 and FACTOR a number > 0, "
                                                   "e.g. 8,1.5")

# (flag, DecodingOptions field, type, help); help ends with the library default.
DECODING_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--num-beams", "num_beams", INT, f"Beams (1 = greedy). Default: the model's, else {D.num_beams}."),
    ("--max-new-tokens", "max_new_tokens", INT, f"Most tokens to generate. Default: the model's, else {D.max_new_tokens}."),
    ("--min-new-tokens", "min_new_tokens", INT, "EOS is banned before this many tokens (0 = no minimum, the model's "
     "min_length too). Default: the model's (its min_new_tokens, else its min_length), else 0."),
    ("--length-penalty", "length_penalty", FLOAT, f"Finished score = logprob / length**penalty. Default: the model's, else {D.length_penalty}."),
    ("--repetition-penalty", "repetition_penalty", FLOAT, f"> 1 discourages repeats (1 = off). Default: the model's, else {D.repetition_penalty}."),
    ("--no-repeat-ngram-size", "no_repeat_ngram_size", INT, f"Ban repeating n-grams of this size (0 = off). Default: the model's, else {D.no_repeat_ngram_size}."),
    ("--sequence-bias", "sequence_bias", JSON, "JSON list of [token ids, bias] pairs added to the scores of "
     "those token sequences, e.g. '[[[10, 45], -2.0]]'. Default: the model's, else none."),
    ("--encoder-repetition-penalty", "encoder_repetition_penalty", FLOAT, "> 1 favours tokens of the prompt "
     "(source), < 1 avoids them (1 = off). Default: the model's, else 1.0."),
    ("--encoder-no-repeat-ngram-size", "encoder_no_repeat_ngram_size", INT, "Ban n-grams of the prompt (source) "
     "of this size (0 = off). Default: the model's, else 0."),
    ("--exponential-decay-length-penalty", "exponential_decay_length_penalty", PAIR, "START,FACTOR: after START "
     "generated tokens, raise EOS's score by FACTOR**k - 1 of itself (k tokens past START). Default: the model's."),
    ("--early-stopping", "early_stopping", str, "true, false or never (beam search stop rule). Default: the model's, else false."),
    ("--num-return-sequences", "num_return_sequences", INT, f"Outputs per prompt (<= beams). Default: the model's, else {D.num_return_sequences}."),
    ("--temperature", "temperature", FLOAT, f"Sampling temperature. Default: the model's, else {D.temperature}."),
    ("--top-k", "top_k", INT, f"Sample from the k most likely tokens (0 = off). Default: the model's, else {D.top_k}."),
    ("--top-p", "top_p", FLOAT, f"Nucleus sampling mass, in (0, 1]. Default: the model's, else {D.top_p}."),
    ("--seed", "seed", INT, "Seed for sampling (random when not given)."),
    ("--max-time", "max_time", FLOAT, "Stop decoding after this many seconds; the outputs so far are returned. "
     "Default: the model's, else none."),
]
FIELDS = [field for _, field, _, _ in DECODING_FLAGS] + ["do_sample"]


def decoding_options(fn: Callable) -> Callable:
    """Add the decoding flags to a click command; read them with `given_options(kwargs)`."""
    for flag, field, kind, text in reversed(DECODING_FLAGS):
        fn = click.option(flag, field, type=kind, default=None, metavar=_metavar(kind), help=text)(fn)
    for flag in ("--num-beam-groups", "--diversity-penalty"):   # group beam search: refused, saying why
        fn = click.option(flag, hidden=True, default=None, expose_value=False, callback=_refuse_groups)(fn)
    return click.option("--do-sample", "do_sample", is_flag=True, default=None,
                        help="Sample instead of searching deterministically.")(fn)


def _refuse_groups(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    # an OptionError: the CLI writes the keywords of the shared message as this command's flags
    if value is not None:
        raise OptionError(f"{param.opts[0]}: {GROUP_BEAM_SEARCH_REFUSED}", param.name or "")


def given_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop the decoding flags out of a command's kwargs; keep those given, checked by DecodingOptions."""
    given = {name: value for name in FIELDS if (value := kwargs.pop(name, None)) is not None}
    # Check now, before a model loads. The model's default num_beams is not known yet: assume enough
    # beams for num_return_sequences (the merged options are checked again once the model is open).
    # Nor is its default max_new_tokens: a --min-new-tokens alone is checked against it once the model is open.
    beams = given.get("num_beams", max(D.num_beams, given.get("num_return_sequences", 1)))
    most = given.get("max_new_tokens", max(D.max_new_tokens, given.get("min_new_tokens", 0)))
    DecodingOptions.from_mapping({**given, "num_beams": beams, "max_new_tokens": most})
    return given


def input_options(fn: Callable) -> Callable:
    """Add --truncation and --window-overlap; read them with `given_input_options(kwargs)`."""
    fn = click.option("--window-overlap", "window_overlap", type=INT, default=None, metavar="INT",
                      help="Tokens shared by consecutive windows (with --truncation sliding-window). Default: 0.")(fn)
    return click.option("--truncation", "truncation", default=None, metavar="left|right|sliding-window",
                        help="Prompts over the model's window: cut from the left or right, or decode the source "
                             "in overlapping windows (encoder-decoder). Default: refuse them.")(fn)


def given_input_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop --truncation/--window-overlap out of a command's kwargs; keep those given, checked by LongInputs."""
    from deploylm.long_inputs import LongInputs

    given = {name: value for name in ("truncation", "window_overlap") if (value := kwargs.pop(name, None)) is not None}
    LongInputs(**given)  # a bad value is one UsageError line, before a model loads
    return given


def torch_options(fn: Callable) -> Callable:
    """Add --device and --dtype (used by the torch backend)."""
    fn = click.option("--dtype", default="float32", show_default=True,
                      help="float32, float16, bfloat16 or int8 (torch backend; int8: Linear layers "
                           "dynamically quantized, CPU only).")(fn)
    return click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")(fn)


def threads_option(fn: Callable) -> Callable:
    """Add --threads (CPU threads: ONNX Runtime's intra-op pool, or PyTorch's: torch.set_num_threads at load)."""
    return click.option("--threads", type=click.IntRange(1), default=None,
                        help="CPU threads: onnx backend, ONNX Runtime's intra-op threads; torch backend, "
                             "PyTorch's. Default: the physical cores. On a machine shared with busy "
                             "processes, 1 can be much faster.")(fn)


def spin_option(fn: Callable) -> Callable:
    """Add --spin (onnx backend: ONNX Runtime threads spin briefly between kernels)."""
    return click.option("--spin", is_flag=True,
                        help="onnx backend: ONNX Runtime's threads spin 20 us between kernels instead of sleeping: "
                             "faster on idle cores (greedy ~1.09x), slower beside busy processes.")(fn)


def _metavar(kind: Any) -> str:
    return {INT: "INT", FLOAT: "FLOAT", JSON: "JSON", PAIR: "START,FACTOR"}.get(kind, "TEXT")


def quiet_transformers() -> None:
    """No weight-loading progress bars from transformers on the terminal (errors and warnings still show)."""
    from transformers.utils import logging

    logging.disable_progress_bar()
