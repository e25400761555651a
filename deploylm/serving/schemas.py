"""Request parsing and validation for the HTTP API: bodies in, validated jobs (or an ApiError) out.

Nothing here touches the network or the model; the app (deploylm.serving.app) feeds bytes in and
turns ApiError into `{"error": {"message", "type", "param"}}` with the error's status.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from deploylm.decoding.options import SAMPLING_ONLY
from deploylm.errors import UsageError


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """Server limits and batching knobs (`deploylm serve --max-...`)."""

    model_name: str = "model"
    max_batch_size: int = 8          # prompts decoded together in one generate call
    max_wait_ms: float = 5.0         # how long the first request of a batch waits for company
    max_queue: int = 64              # requests waiting (not yet decoding); beyond: 503 + Retry-After
    max_streams: int = 16            # concurrent streaming responses; beyond: 503 + Retry-After
    max_prompt_tokens: int = 512     # per prompt
    max_new_tokens: int = 256        # the largest max_new_tokens a request may ask for
    max_beams: int = 16              # the largest num_beams / best_of
    max_prompts: int = 64            # prompts in one request
    max_body_bytes: int = 1 << 20    # request body; beyond: 413
    drain_timeout_s: float = 30.0    # on SIGTERM: how long in-flight requests may take to finish
    model_summary: dict[str, Any] = field(default_factory=dict)  # shown by GET /v1/models

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_streams", "max_prompt_tokens", "max_new_tokens",
                     "max_beams", "max_prompts", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise UsageError(f"serve option {name}={getattr(self, name)} is invalid: use a value >= 1")
        if not self.max_wait_ms >= 0 or self.max_wait_ms == math.inf or not self.drain_timeout_s >= 0:  # nan too
            raise UsageError(f"serve options max_wait_ms={self.max_wait_ms} and drain_timeout_s={self.drain_timeout_s}: "
                             "use finite numbers >= 0 (drain_timeout_s may be inf)")


class ApiError(Exception):
    """An error answered to the client: HTTP status, one-line message, OpenAI-style type and param."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param}}


@dataclass(frozen=True)
class Job:
    """One validated request: prompts plus the decoding options the client gave (explicit ones only)."""

    prompts: tuple[str, ...]
    options: dict[str, Any]          # passed to Generator.generate/stream as keywords (no sampling-only ones
                                     # in a request that does not sample: they would change nothing)
    stream: bool = False
    max_new_tokens: int = 64         # resolved (for finish_reason)
    samples: bool | None = None      # resolved do_sample (the model's defaults may sample); None: options say

    def batch_key(self) -> Any:
        """Requests with equal keys may share a batch. Sampling never shares: its random stream would. A request
        that does not sample shares whatever sampling-only options it carries (an OpenAI client's seed)."""
        samples = self.options.get("do_sample") if self.samples is None else self.samples
        if samples:
            return object()
        return tuple(sorted((k, type(v).__name__, v) for k, v in self.options.items() if k not in SAMPLING_OPTIONS))


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """Bytes -> a JSON object, or ApiError(400) saying what is wrong with the body."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise ApiError(400, "request body is empty: expected a JSON object")
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply: expected a JSON object of options") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


Room = Callable[[int], int | None]   # a prompt's tokens -> the most new tokens the model's window has room for


def parse_generate(body: dict[str, Any], config: ServeConfig, count_tokens: Callable[[str], int],
                   defaults: Any = None, room: Room | None = None) -> Job:
    """`POST /v1/generate` body -> Job: `prompt`, `stream`, and the decoding options (underscores).
    room: the model's window (deploylm.long_inputs.new_token_room), which bounds a default max_new_tokens."""
    body = dict(body)
    if "prompt" not in body:
        raise ApiError(400, "missing field 'prompt': expected a string or a list of strings", param="prompt")
    prompts, longest = _prompts(body.pop("prompt"), config, count_tokens, "prompt")
    stream = _bool(body.pop("stream", False), "stream")
    options = validate_options(body, config, defaults, room(longest) if room else None, stream=stream)
    given = [name for name in SAMPLING_OPTIONS if name in options]
    if given and not resolve(options, defaults).do_sample:  # as `deploylm generate`: not silently deterministic
        raise ApiError(400, f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} only when sampling, and this "
                       "request searches deterministically (greedy or beam search): add \"do_sample\": true, or leave "
                       f"{'them' if len(given) > 1 else 'it'} out", param=given[0])
    return _job(prompts, options, stream, defaults)


SAMPLING_OPTIONS = tuple(SAMPLING_ONLY)   # temperature, top_k, top_p, seed: change nothing unless the request samples


def resolve(options: dict[str, Any], defaults: Any = None) -> Any:
    """The DecodingOptions a call with `options` uses: over the model's defaults when known."""
    from deploylm.decoding.options import DecodingOptions

    if defaults is None:
        return DecodingOptions.from_mapping(options)
    return defaults.replace(**options)


def _job(prompts: tuple[str, ...], options: dict[str, Any], stream: bool, defaults: Any) -> Job:
    resolved = resolve(options, defaults)
    if stream and len(prompts) != 1:
        raise ApiError(400, f"stream takes exactly one prompt, got {len(prompts)}", param="prompt")
    if stream and resolved.num_return_sequences != 1:
        raise ApiError(400, f"stream returns one sequence: num_return_sequences={resolved.num_return_sequences} "
                       "must be 1", param="num_return_sequences")
    if not resolved.do_sample:   # a completions client's seed (or top_p 1): not passed on, they change nothing here
        options = {name: value for name, value in options.items() if name not in SAMPLING_OPTIONS}
    return Job(prompts, options, stream, resolved.max_new_tokens, bool(resolved.do_sample))


def validate_options(options: dict[str, Any], config: ServeConfig, defaults: Any = None,
                     room: int | None = None, stream: bool = False) -> dict[str, Any]:
    """Check decoding options with DecodingOptions' own validation plus the server's caps.

    A value the request gives over a limit is a 400. One it leaves out (the model's default, else DecodingOptions')
    is lowered to the limit instead, and sent on as an option: the client asked for none of it, so a model whose
    generation_config says num_beams=5 served with --max-beams 4 answers a plain request with 4 beams, as a
    default max_new_tokens over --max-new-tokens decodes that many tokens. `room` (the most new tokens the model's
    window has room for after the request's longest prompt; None: unbounded) lowers a default max_new_tokens
    the same way: a plain request on a small-window model is answered with what fits (finish_reason "length" says
    it was cut) rather than refused; a max_new_tokens the request gives over the window stays the generator's 400.
    A stream returns one sequence: a default num_return_sequences is lowered to 1 (the request's own other than 1
    is _job's 400). The defaults are lowered before the request's options are checked against them: a request
    with num_beams=4 to a model whose default num_return_sequences of 5 is over --max-beams 4 gets 4 sequences,
    as a request that leaves both out does, not a 400 about a num_return_sequences it never sent."""
    from deploylm.decoding.options import DecodingOptions

    limits = {"max_new_tokens": config.max_new_tokens, "num_return_sequences": config.max_beams,
              "num_beams": config.max_beams}   # n (num_return_sequences) before the beams it implies
    fits = room is not None and 1 <= room < config.max_new_tokens   # 0: the prompt alone is over the window
    default_limits = {**limits, "max_new_tokens": room} if fits else dict(limits)
    if stream:
        default_limits["num_return_sequences"] = 1
    base = defaults if defaults is not None else DecodingOptions()   # what the request leaves out
    capped = {name: cap for name, cap in default_limits.items()
              if name not in options and getattr(base, name) > cap}
    try:
        resolved = resolve(options, defaults)
    except UsageError as exc:
        if not capped:
            raise ApiError(400, str(exc), param=_param_of(str(exc), options)) from None
        resolved = None     # perhaps only against a default the caps lower (num_return_sequences > num_beams)
    for name, cap in limits.items():
        value = options.get(name) if resolved is None else getattr(resolved, name)
        if name in options and _is_number(value) and value > cap:
            raise ApiError(400, f"{name}={value} is over this server's limit of {cap}", param=name)
    if not capped:
        return dict(options)
    options = {**options, **capped}
    try:
        resolve(options, defaults)
    except UsageError as exc:   # e.g. a min_new_tokens above the capped default: say where the cap comes from
        if resolved is None and not any(f"{name}={cap}" in str(exc) for name, cap in capped.items()):
            raise ApiError(400, str(exc), param=_param_of(str(exc), options)) from None   # the request's own
        raise ApiError(400, f"{exc} ({_capped_note(_named_in(capped, str(exc)), window=fits, stream=stream)})",
                       param=next((n for n in options if n not in capped and n in str(exc)), None)) from None
    return options


def _named_in(capped: dict[str, int], message: str) -> dict[str, int]:
    """The lowered defaults `message` is about ("max_new_tokens=32"), so the note explains those and not every value
    the server lowered (a min_new_tokens conflict has nothing to do with the beams); all of them if it names none."""
    named = {name: cap for name, cap in capped.items() if f"{name}={cap}" in message}
    return named or capped


def _capped_note(capped: dict[str, int], window: bool = False, stream: bool = False) -> str:
    """Why the request holds values it did not send: "max_new_tokens=32 is this server's limit, applied because
    the request left max_new_tokens out". window: max_new_tokens is what the model's window has room for;
    stream: num_return_sequences is what a stream returns."""
    def why(name: str) -> str:
        if window and name == "max_new_tokens":
            return "what the model's window has room for after the prompt"
        return "what a stream returns" if stream and name == "num_return_sequences" else "this server's limit"

    if len(capped) == 1:
        name, cap = next(iter(capped.items()))
        return f"{name}={cap} is {why(name)}, applied because the request left {name} out"
    values = ", ".join(f"{name}={cap} ({why(name)})" for name, cap in capped.items())
    return f"{values}: applied because the request left them out"


_PARAM_RE = (re.compile(r"decoding option (\w+)="), re.compile(r"unknown decoding option\(s\) '(\w+)'"))


def _param_of(message: str, options: dict[str, Any]) -> str | None:
    """The option a DecodingOptions error is about (it names it in its message)."""
    for pattern in _PARAM_RE:
        match = pattern.search(message)
        if match:
            return match.group(1)
    named = [name for name in options if name in message]
    return named[0] if named else None


# A prompt longer than this many characters per allowed token is refused without tokenizing it. Byte-level
# BPE merges runs of spaces or "=" into tokens of ~64 characters (SmolLM2: 9,000 spaces are 143 tokens),
# so the bound must sit above that; the body limit (--max-body-bytes) bounds the tokenizer's work anyway.
CHARS_PER_TOKEN_CAP = 256


def _prompts(value: Any, config: ServeConfig, count_tokens: Callable[[str], int],
             param: str) -> tuple[tuple[str, ...], int]:
    """The request's prompts, checked, and the most tokens one of them has."""
    prompts = [value] if isinstance(value, str) else value
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ApiError(400, f"'{param}' must be a string or a list of strings, got {_kind(value)}",
                       param=param)
    if not prompts:
        raise ApiError(400, f"'{param}' is an empty list: give at least one prompt", param=param)
    if len(prompts) > config.max_prompts:
        raise ApiError(400, f"'{param}' has {len(prompts)} prompts, over this server's limit of "
                       f"{config.max_prompts} per request", param=param)
    longest = 0
    for i, prompt in enumerate(prompts):
        where = param if isinstance(value, str) else f"{param}[{i}]"
        if not prompt.strip():
            # the generator's words ("give some text to continue" read wrongly for an encoder-decoder)
            raise ApiError(400, f"{where} is {'empty' if not prompt else 'only whitespace'}: expected some text",
                           param=param)
        if "\x00" in prompt:
            raise ApiError(400, f"{where} contains a NUL character", param=param)
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:       # "\ud800" is valid JSON but no text
            raise ApiError(400, f"{where} is not valid Unicode text: a lone surrogate at character {exc.start}",
                           param=param) from None
        if len(prompt) > CHARS_PER_TOKEN_CAP * config.max_prompt_tokens:  # no tokenizer run on absurd inputs
            raise ApiError(400, f"{where} has {len(prompt)} characters, far over this server's limit of "
                           f"{config.max_prompt_tokens} tokens", param=param)
        n = count_tokens(prompt)
        if n > config.max_prompt_tokens:
            raise ApiError(400, f"{where} has {n} tokens, over this server's limit of "
                           f"{config.max_prompt_tokens}", param=param)
        longest = max(longest, n)
    return tuple(prompts), longest


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list with non-string items", type(None): "null",
            bool: "a boolean"}.get(type(value), type(value).__name__)


def _bool(value: Any, param: str) -> bool:
    if not isinstance(value, bool):
        raise ApiError(400, f"'{param}' must be true or false, got {_kind(value)}", param=param)
    return value


# OpenAI completions field -> deploylm decoding option
COMPLETION_FIELDS = {"max_tokens": "max_new_tokens", "n": "num_return_sequences", "best_of": "num_beams",
                     "temperature": "temperature", "top_p": "top_p", "seed": "seed"}
COMPLETION_IGNORED = ("model", "user")
# DecodingOptions' advice that names do_sample, in completions' terms (a temperature > 0 samples, 0 is greedy)
COMPLETION_ADVICE = {"or do_sample": "or a temperature > 0 (sampling)",
                     "(for greedy decoding leave do_sample off)": "(or temperature 0 for greedy decoding)",
                     "with do_sample; without it (greedy or beam search) leave temperature out":
                         "(or temperature 0 for greedy decoding)"}
COMPLETION_UNSUPPORTED = ("logprobs", "echo", "stop", "presence_penalty", "frequency_penalty", "logit_bias",
                          "suffix", "stream_options")


def parse_completion(body: dict[str, Any], config: ServeConfig, count_tokens: Callable[[str], int],
                     defaults: Any = None, room: Room | None = None) -> Job:
    """`POST /v1/completions` (OpenAI shape) -> Job. temperature > 0 or top_p < 1 turns sampling on.
    room: as parse_generate's."""
    body = dict(body)
    for name in COMPLETION_UNSUPPORTED:
        if name in body and not _is_off(body[name]):
            raise ApiError(400, f"'{name}' is not supported by this server (only its off value, e.g. null)", param=name)
        body.pop(name, None)
    unknown = sorted(set(body) - set(COMPLETION_FIELDS) - set(COMPLETION_IGNORED) - {"prompt", "stream"})
    if unknown:
        raise ApiError(400, f"unknown field '{unknown[0]}': expected any of prompt, stream, "
                       f"{', '.join(COMPLETION_FIELDS)}, {', '.join(COMPLETION_IGNORED)}", param=unknown[0])
    if "prompt" not in body:
        raise ApiError(400, "missing field 'prompt': expected a string or a list of strings", param="prompt")
    prompts, longest = _prompts(body["prompt"], config, count_tokens, "prompt")
    stream = _bool(_null_off(body.get("stream")), "stream")    # OpenAI: null is every field's off value
    options = {COMPLETION_FIELDS[k]: v for k, v in body.items() if k in COMPLETION_FIELDS and v is not None}
    sent = {v: k for k, v in COMPLETION_FIELDS.items()}     # deploylm option -> the field the client sent
    model_samples = getattr(defaults, "do_sample", False) is True   # a profile's [generation] may sample
    if _is_zero(options.get("temperature")):                # OpenAI: temperature 0 = deterministic, top_p aside
        options.pop("temperature")
        options.pop("top_p", None)
        if model_samples:                                   # deterministic whatever the model's defaults say
            options["do_sample"] = False
    elif _is_zero(options.get("top_p")):                    # OpenAI: top_p 0 keeps only the most likely token
        options.pop("top_p")
        if _sampling(options) or model_samples:
            options["top_k"] = 1
    sampling = _sampling(options) or (model_samples and "do_sample" not in options)
    if "num_beams" not in options and sampling:
        options["num_beams"] = 1                            # OpenAI: n independent samples, not beam sampling
    elif "num_return_sequences" in options and "num_beams" not in options:
        options["num_beams"] = options["num_return_sequences"]
        sent["num_beams"] = "n"                             # beams taken from n: n is the field to fix
    if sampling:
        options["do_sample"] = True
    try:
        options = validate_options(options, config, defaults, room(longest) if room else None, stream=stream)
        return _job(prompts, options, stream, defaults)
    except ApiError as exc:   # name the completions fields the client sent, not deploylm's options
        if exc.param in sent:
            exc.message = exc.message.replace(f"{exc.param}=", f"{sent[exc.param]}=", 1)
            exc.param = sent[exc.param]
        for option, name in sent.items():                   # in the advice too ("use max_tokens >= 1"),
            if name in body:                                # for the fields the client sent
                exc.message = re.sub(rf"\b{option}\b", name, exc.message)
        for advice, completion_advice in COMPLETION_ADVICE.items():   # no do_sample field here: temperature
            exc.message = exc.message.replace(advice, completion_advice)
        raise


def _is_off(value: Any) -> bool:
    """What a client library sends for a feature it does not use (accepted; anything else is refused):
    null, false, a zero number (0 or 0.0; true is no number), "", [], or an object of off values ({},
    `stream_options: {"include_usage": false}`, a `logit_bias` of zeros)."""
    if isinstance(value, dict):
        return all(_is_off(v) for v in value.values())
    return value is None or value is False or (_is_number(value) and value == 0) or value in ("", [])


def _null_off(value: Any) -> Any:
    return False if value is None else value


def _is_zero(value: Any) -> bool:
    """0 or 0.0, not false (`False == 0` in Python; JSON's false is no number, and validation refuses it)."""
    return _is_number(value) and value == 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sampling(options: dict[str, Any]) -> bool:
    """OpenAI semantics: a temperature above 0 or a top_p below 1 means sampling."""
    temperature, top_p = options.get("temperature"), options.get("top_p")
    return (_is_number(temperature) and temperature > 0) or (_is_number(top_p) and 0 < top_p < 1)
