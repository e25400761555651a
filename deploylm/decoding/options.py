"""DecodingOptions: the flat, frozen, keyword-only options of every generation call.

Names follow the CLI (`--num-beams` -> `num_beams`) and transformers' GenerationConfig. Defaults are
deploylm's (beam search with 4 beams, 64 new tokens); note that transformers' `top_k` defaults to 50
while ours is 0 (off), so pass `top_k` explicitly when comparing sampled outputs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from deploylm.errors import UsageError

EarlyStopping = bool | str  # True | False | "never"


@dataclass(frozen=True, kw_only=True)
class DecodingOptions:
    """How to search. Beam search when num_beams > 1, greedy when 1; do_sample samples (beam sampling
    when num_beams > 1, as transformers). Validated on construction: a bad value raises UsageError."""

    num_beams: int = 4
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    early_stopping: EarlyStopping = False
    num_return_sequences: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_time: float | None = None

    def __post_init__(self) -> None:
        _check_types(self)
        object.__setattr__(self, "early_stopping", _parse_early_stopping(self.early_stopping))
        for name, value in _float_fields(self).items():
            object.__setattr__(self, name, value)
        _check_ranges(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "DecodingOptions":
        """Build from a dict (HTTP request, artifact defaults); unknown keys are an error."""
        unknown = sorted(set(values) - set(option_names()))
        if unknown:
            raise UsageError(f"unknown decoding option(s) {', '.join(map(repr, unknown))}: "
                             f"expected any of {', '.join(option_names())}")
        return cls(**dict(values))

    def replace(self, **changes: Any) -> "DecodingOptions":
        """A copy with `changes` applied (validated); unknown names are an error."""
        unknown = sorted(set(changes) - set(option_names()))
        if unknown:
            raise UsageError(f"unknown decoding option(s) {', '.join(map(repr, unknown))}: "
                             f"expected any of {', '.join(option_names())}")
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


_INTS = ("num_beams", "max_new_tokens", "min_new_tokens", "no_repeat_ngram_size", "num_return_sequences",
         "top_k")
_FLOATS = ("length_penalty", "repetition_penalty", "temperature", "top_p")


def _bad(name: str, value: Any, expected: str) -> UsageError:
    return UsageError(f"decoding option {name}={value!r} is invalid: {expected}")


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
    if o.seed is not None and (isinstance(o.seed, bool) or not isinstance(o.seed, int)):
        raise _bad("seed", o.seed, "expected an integer or none")
    if o.max_time is not None and (isinstance(o.max_time, bool) or not isinstance(o.max_time, (int, float))):
        raise _bad("max_time", o.max_time, "expected a number of seconds or none")


def _float_fields(o: DecodingOptions) -> dict[str, float]:
    out = {name: float(getattr(o, name)) for name in _FLOATS}
    if o.max_time is not None:
        out["max_time"] = float(o.max_time)
    return out


def _parse_early_stopping(value: Any) -> EarlyStopping:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "never"):
        return {"true": True, "false": False, "never": "never"}[value.lower()]
    raise _bad("early_stopping", value, "expected true, false or \"never\"")


def _check_ranges(o: DecodingOptions) -> None:
    checks = [
        ("num_beams", o.num_beams >= 1, "use num_beams >= 1 (1 = greedy or plain sampling)"),
        ("max_new_tokens", o.max_new_tokens >= 1, "use max_new_tokens >= 1"),
        ("min_new_tokens", o.min_new_tokens >= 0, "use min_new_tokens >= 0"),
        ("max_new_tokens", o.max_new_tokens >= o.min_new_tokens,
         f"must be >= min_new_tokens={o.min_new_tokens}; raise max_new_tokens or lower min_new_tokens"),
        ("repetition_penalty", o.repetition_penalty > 0,
         "use a penalty > 0 (1.0 = off, > 1 discourages repeats)"),
        ("no_repeat_ngram_size", o.no_repeat_ngram_size >= 0, "use 0 (off) or an n-gram size >= 1"),
        ("num_return_sequences", o.num_return_sequences >= 1, "use num_return_sequences >= 1"),
        ("temperature", o.temperature > 0, "use a temperature > 0 (for greedy decoding leave do_sample off)"),
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
