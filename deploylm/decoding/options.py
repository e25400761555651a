"""DecodingOptions: the flat, frozen, keyword-only options of every generation call.

Names follow the CLI (`--num-beams` -> `num_beams`) and transformers' GenerationConfig. Defaults are
deploylm's (beam search with 4 beams, 64 new tokens); note that transformers' `top_k` defaults to 50
while ours is 0 (off), so pass `top_k` explicitly when comparing sampled outputs.

The settings a model's generation_config may also carry (sequence_bias, encoder_repetition_penalty,
encoder_no_repeat_ngram_size, exponential_decay_length_penalty) default to None, "the model's": a value
given here replaces the model's for the call (as a `generate()` keyword replaces the generation_config's).
Group beam search (num_beam_groups, diversity_penalty) is refused: transformers 5 moved it out of `generate`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import math
import numbers
from typing import Any, Mapping

from deploylm.errors import OptionError, UsageError

EarlyStopping = bool | str  # True | False | "never"
SequenceBias = tuple[tuple[tuple[int, ...], float], ...]  # ((token ids, bias), ...)

# Options transformers 5's generate() no longer runs itself: group beam search lives in a Hub repo
# (transformers-community/group-beam-search) that `generate` loads only with trust_remote_code=True.
REFUSED_OPTIONS = ("num_beam_groups", "diversity_penalty")
GROUP_BEAM_SEARCH_UNSUPPORTED = (
    "group beam search (num_beam_groups > 1, diversity_penalty) is not supported: transformers 5's generate moved "
    "it to the Hub repo transformers-community/group-beam-search (it runs only with trust_remote_code=True), "
    "and deploylm does not run remote code")
# the refusal of a call's options; a model whose generation_config sets the groups has its own advice
GROUP_BEAM_SEARCH_REFUSED = (GROUP_BEAM_SEARCH_UNSUPPORTED
                             + "; use plain beam search (num_beams) or sampling (do_sample) instead")


@dataclass(frozen=True, kw_only=True)
class DecodingOptions:
    """How to search. Beam search when num_beams > 1, greedy when 1; do_sample samples (beam sampling
    when num_beams > 1, as transformers). Validated on construction: a bad value raises UsageError."""

    num_beams: int = 4
    max_new_tokens: int = 64
    # None = the model's: its generation_config min_new_tokens, else its min_length (a total length, prompt
    # included); a number, 0 too, replaces the model's min_length, as transformers' min_new_tokens does
    min_new_tokens: int | None = None
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    # None = the model's generation_config setting (off when it has none)
    sequence_bias: SequenceBias | None = None                  # ((token ids, bias), ...); () = off
    encoder_repetition_penalty: float | None = None            # > 1 favours prompt tokens; 1.0 = off
    encoder_no_repeat_ngram_size: int | None = None            # ban n-grams of the prompt; 0 = off
    exponential_decay_length_penalty: tuple[int, float] | None = None   # (start, factor): EOS boost
    early_stopping: EarlyStopping = False
    num_return_sequences: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_time: float | None = None

    def __post_init__(self) -> None:
        for name in _INTS + _OPTIONAL_INTS + _FLOATS + _OPTIONAL_FLOATS:
            object.__setattr__(self, name, _plain(name, getattr(self, name)))
        _check_types(self)
        object.__setattr__(self, "early_stopping", _parse_early_stopping(self.early_stopping))
        if self.sequence_bias is not None:
            object.__setattr__(self, "sequence_bias", parse_sequence_bias(self.sequence_bias))
        if self.exponential_decay_length_penalty is not None:
            object.__setattr__(self, "exponential_decay_length_penalty",
                               parse_exponential_decay(self.exponential_decay_length_penalty))
        for name, value in _float_fields(self).items():
            object.__setattr__(self, name, value)
        _check_ranges(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "DecodingOptions":
        """Build from a dict (HTTP request, artifact defaults); unknown keys are an error."""
        _refuse(values)
        unknown = sorted(set(values) - set(option_names()))
        if unknown:
            raise UsageError(f"unknown decoding option(s) {', '.join(map(repr, unknown))}: "
                             f"expected any of {', '.join(option_names())}")
        return cls(**dict(values))

    def replace(self, **changes: Any) -> "DecodingOptions":
        """A copy with `changes` applied (validated); unknown names are an error.

        A min_new_tokens kept from here (a model's default) above the max_new_tokens given in `changes` is
        lowered to it: EOS is then banned to the end, as transformers' generate does with such a
        generation_config. Both given together and contradictory is still a UsageError."""
        _refuse(changes)
        unknown = sorted(set(changes) - set(option_names()))
        if unknown:
            raise UsageError(f"unknown decoding option(s) {', '.join(map(repr, unknown))}: "
                             f"expected any of {', '.join(option_names())}")
        changes = {name: _plain(name, value) for name, value in changes.items()}   # np.int64(2) is 2 below
        least_default = self.min_new_tokens or 0
        if not {"max_new_tokens", "min_new_tokens"} & set(changes) and least_default > self.max_new_tokens:
            # only a model's loose defaults (Generator) hold this: the call gave neither, so name neither as its option
            raise UsageError(f"the model's default min_new_tokens={self.min_new_tokens} is above the default "
                             f"max_new_tokens={self.max_new_tokens} (the model's generation_config, else deploylm's): "
                             "give max_new_tokens in the call, or a lower min_new_tokens")
        wanted = changes.get("max_new_tokens")
        if "min_new_tokens" not in changes and type(wanted) is int and 1 <= wanted < least_default:
            changes = {**changes, "min_new_tokens": wanted}
        least = changes.get("min_new_tokens")
        if "max_new_tokens" not in changes and type(least) is int and least > self.max_new_tokens:
            # the call did not give max_new_tokens: name what it gave, not the default it contradicts
            raise _bad("min_new_tokens", least, f"above the default max_new_tokens={self.max_new_tokens} (the model's "
                       "generation_config, else deploylm's); give max_new_tokens too, at least as large, or lower "
                       "min_new_tokens")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def is_beam_search(self) -> bool:
        return self.num_beams > 1

    @property
    def rows_per_input(self) -> int:
        """Decoder rows per input: the beams, the sampled draws, or 1 for greedy."""
        if self.num_beams > 1:
            return self.num_beams
        return self.num_return_sequences if self.do_sample else 1


def option_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(DecodingOptions))


# Options that change nothing unless a call samples (do_sample), each with its value that changes nothing at all
SAMPLING_ONLY = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": None}


def call_keywords(options: DecodingOptions) -> dict[str, Any]:
    """`options` as the keywords of a Generator call (each replaces the model's default), less the sampling-only
    ones when `options` do not sample: they would change nothing, and a call given a temperature, top_k or top_p
    it ignores warns the caller (Generator.generate). What internal callers (deploylm bench) pass."""
    values = options.to_dict()
    return values if options.do_sample else {k: v for k, v in values.items() if k not in SAMPLING_ONLY}


_INTS = ("num_beams", "max_new_tokens", "no_repeat_ngram_size", "num_return_sequences", "top_k")
_FLOATS = ("length_penalty", "repetition_penalty", "temperature", "top_p")
_OPTIONAL_INTS = ("min_new_tokens", "seed", "encoder_no_repeat_ngram_size")   # None or an integer
_OPTIONAL_FLOATS = ("encoder_repetition_penalty", "max_time")                  # None or a number
# Bounds that keep the float32 search finite: a score is divided by generated_len ** length_penalty
# (4096 ** 10 is 1e36), logits by the temperature, and a sequence bias is added to log-probabilities
# next to the -1e9 that masks candidates. Typical values: length_penalty 0-2, temperature 0.1-2, bias ±10.
MAX_LENGTH_PENALTY = 10.0
MIN_TEMPERATURE = 1e-6
MAX_SEQUENCE_BIAS = 1e6


def _bad(name: str, value: Any, expected: str) -> UsageError:
    return OptionError(f"decoding option {name}={value!r} is invalid: {expected}", name)


def invalid(where: str, name: str, message: str) -> UsageError:
    """A call's option (`where` "decoding option") is an OptionError the CLI names by its flag; a model's own
    setting ("generation setting") is not one the user typed."""
    return OptionError(message, name) if where == "decoding option" else UsageError(message)


def _refuse(names: Any) -> None:
    for name in REFUSED_OPTIONS:
        if name in names:
            raise OptionError(GROUP_BEAM_SEARCH_REFUSED, name)


def parse_sequence_bias(value: Any, where: str = "decoding option") -> SequenceBias:
    """sequence_bias as transformers takes it, a list of [token ids, bias] pairs or a {token ids: bias} dict,
    as a tuple of (ids tuple, float) pairs; a repeated token sequence keeps its last bias (transformers' dict).
    Empty means no bias. Anything else is a UsageError naming `where` ("decoding option", "generation setting")."""
    def bad() -> UsageError:
        return invalid(where, "sequence_bias", f"{where} sequence_bias={value!r} is invalid: expected a list of "
                        "[token ids, bias] pairs, e.g. [[[10, 45], -2.0], [[64], 1.5]]")
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        pairs = [tuple(p) for p in value]
    else:
        raise bad()
    out: dict[tuple[int, ...], float] = {}
    for ids, bias in pairs:
        if not isinstance(ids, (list, tuple)) or not ids or any(
                isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0 for t in ids):
            raise bad()
        if isinstance(bias, bool) or not isinstance(bias, numbers.Real) or not math.isfinite(bias):
            raise bad()
        if abs(bias) > MAX_SEQUENCE_BIAS:
            # bad_words_ids is a generation_config setting only, not an option of a call
            forbid = ("use bad_words_ids" if where != "decoding option" else
                      f"give it a bias of -{MAX_SEQUENCE_BIAS:g} (or list it in the model's generation_config "
                      "bad_words_ids)")
            raise invalid(where, "sequence_bias", f"{where} sequence_bias={value!r} is invalid: a bias of {bias!r} is "
                           f"beyond ±{MAX_SEQUENCE_BIAS:g}, which already decides every step (larger values overflow "
                           f"the float32 scores); to forbid a sequence {forbid}")
        out[tuple(int(t) for t in ids)] = float(bias)     # NumPy ids and biases as plain int and float
    return tuple(out.items())


def parse_exponential_decay(value: Any, where: str = "decoding option") -> tuple[int, float]:
    """exponential_decay_length_penalty (start, factor): start an integer >= 0 (generated tokens before
    the boost starts), factor a number > 0 (1.0 = no effect, > 1 makes EOS ever more likely)."""
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    start, factor = value if ok else (None, None)
    ok = ok and isinstance(start, numbers.Integral) and not isinstance(start, bool) and start >= 0
    ok = ok and isinstance(factor, numbers.Real) and not isinstance(factor, bool) and math.isfinite(factor) \
        and factor > 0
    if not ok:
        raise invalid(where, "exponential_decay_length_penalty", f"{where} exponential_decay_length_penalty={value!r} "
                       "is invalid: expected [start, factor] with start an integer >= 0 and factor a number > 0, "
                       "e.g. [8, 1.5]")
    return int(start), float(factor)


def _plain(name: str, value: Any) -> Any:
    """A NumPy scalar (or any numbers.Integral / numbers.Real) given for option `name` as the plain Python int or
    float the option holds: options computed with NumPy work (transformers takes them too), and nothing downstream
    (to_dict's JSON, torch's manual_seed) sees a NumPy type. Anything else is returned as given, for _check_types
    to refuse by its repr: a bool (np.bool_ is no Integral either), a string, 2.5 or np.float64(2.0) for an integer."""
    if isinstance(value, bool) or type(value) in (int, float):
        return value
    if name in _INTS + _OPTIONAL_INTS and isinstance(value, numbers.Integral):
        return int(value)
    if name in _FLOATS + _OPTIONAL_FLOATS and isinstance(value, numbers.Real):
        return float(value)
    return value


def _check_types(o: DecodingOptions) -> None:
    for name in _INTS:
        value = getattr(o, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(name, value, "expected an integer")
    for name in _FLOATS:
        value = getattr(o, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(name, value, "expected a number")
    if not isinstance(o.do_sample, bool):
        raise _bad("do_sample", o.do_sample, "expected true or false")
    if o.min_new_tokens is not None and (isinstance(o.min_new_tokens, bool) or not isinstance(o.min_new_tokens, int)):
        raise _bad("min_new_tokens", o.min_new_tokens, "expected an integer or none (the model's)")
    if o.seed is not None and (isinstance(o.seed, bool) or not isinstance(o.seed, int)):
        raise _bad("seed", o.seed, "expected an integer or none")
    if o.seed is not None and not 0 <= o.seed < 2**63:   # torch.Generator.manual_seed wraps or overflows
        raise _bad("seed", o.seed, "out of range, expected 0 <= seed < 2**63")
    if o.encoder_repetition_penalty is not None and (isinstance(o.encoder_repetition_penalty, bool) or not
                                                     isinstance(o.encoder_repetition_penalty, (int, float))):
        raise _bad("encoder_repetition_penalty", o.encoder_repetition_penalty, "expected a number or none")
    if o.encoder_no_repeat_ngram_size is not None and (isinstance(o.encoder_no_repeat_ngram_size, bool) or not
                                                       isinstance(o.encoder_no_repeat_ngram_size, int)):
        raise _bad("encoder_no_repeat_ngram_size", o.encoder_no_repeat_ngram_size, "expected an integer or none")
    if o.max_time is not None and (isinstance(o.max_time, bool) or not isinstance(o.max_time, (int, float))):
        raise _bad("max_time", o.max_time, "expected a number of seconds or none")


def _float_fields(o: DecodingOptions) -> dict[str, float]:
    out = {name: float(getattr(o, name)) for name in _FLOATS}
    if o.max_time is not None:
        out["max_time"] = float(o.max_time)
    if o.encoder_repetition_penalty is not None:
        out["encoder_repetition_penalty"] = float(o.encoder_repetition_penalty)
    return out


def _parse_early_stopping(value: Any) -> EarlyStopping:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "never"):
        return {"true": True, "false": False, "never": "never"}[value.lower()]
    raise _bad("early_stopping", value, "expected true, false or \"never\"")


def _check_ranges(o: DecodingOptions) -> None:
    for name, value in _float_fields(o).items():
        if math.isnan(value) or (math.isinf(value) and name != "max_time"):
            raise _bad(name, value, "expected a finite number")
    checks = [
        ("num_beams", o.num_beams >= 1, "use num_beams >= 1 (1 = greedy or plain sampling)"),
        ("max_new_tokens", o.max_new_tokens >= 1, "use max_new_tokens >= 1"),
        ("min_new_tokens", o.min_new_tokens is None or o.min_new_tokens >= 0, "use min_new_tokens >= 0"),
        ("max_new_tokens", o.min_new_tokens is None or o.max_new_tokens >= o.min_new_tokens,
         f"must be >= min_new_tokens={o.min_new_tokens}; raise max_new_tokens or lower min_new_tokens"),
        ("repetition_penalty", o.repetition_penalty > 0,
         "use a penalty > 0 (1.0 = off, > 1 discourages repeats)"),
        ("no_repeat_ngram_size", o.no_repeat_ngram_size >= 0, "use 0 (off) or an n-gram size >= 1"),
        ("encoder_repetition_penalty", o.encoder_repetition_penalty is None or o.encoder_repetition_penalty > 0,
         "use a penalty > 0 (1.0 = off, > 1 favours tokens of the prompt)"),
        ("encoder_no_repeat_ngram_size", o.encoder_no_repeat_ngram_size is None or o.encoder_no_repeat_ngram_size >= 0,
         "use 0 (off) or an n-gram size >= 1"),
        ("num_return_sequences", o.num_return_sequences >= 1, "use num_return_sequences >= 1"),
        ("temperature", o.temperature >= MIN_TEMPERATURE,
         f"use a temperature >= {MIN_TEMPERATURE:g} " + ("(for greedy decoding leave do_sample off)" if o.do_sample else
                                                       "with do_sample; without it (greedy or beam search) leave "
                                                       "temperature out")),
        ("length_penalty", abs(o.length_penalty) <= MAX_LENGTH_PENALTY,
         f"use a length_penalty between -{MAX_LENGTH_PENALTY:g} and {MAX_LENGTH_PENALTY:g} (1.0 = the default; "
         "> 0 favours longer sequences, < 0 shorter)"),
        ("top_k", o.top_k >= 0, "use 0 (off) or top_k >= 1"),
        ("top_p", 0 < o.top_p <= 1, "use 0 < top_p <= 1 (1.0 = off)"),
        ("max_time", o.max_time is None or o.max_time > 0, "use a positive number of seconds or none"),
    ]
    for name, ok, fix in checks:
        if not ok:
            raise _bad(name, getattr(o, name), fix)
    if o.num_beams > 1 and o.num_return_sequences > o.num_beams:
        raise _bad("num_return_sequences", o.num_return_sequences,
                   f"beam search returns at most num_beams={o.num_beams} sequences; "
                   "raise num_beams or lower num_return_sequences")
    if o.num_beams == 1 and not o.do_sample and o.num_return_sequences > 1:
        raise _bad("num_return_sequences", o.num_return_sequences,
                   "greedy decoding returns one sequence; use num_beams >= num_return_sequences or do_sample")
