"""A scripted stand-in for deploylm.Generator (same interface), for tests that need control over
timing and failures: deterministic outputs that depend only on (prompt, options), so a batched
answer must equal the same request decoded alone.

Special prompts: one containing "BOOM" makes the whole generate call raise RuntimeError; one
containing "BAD" raises UsageError (as the real Generator does for an input it refuses); one containing
"NAN" raises NumericalOverflow (as the real Generator does when the model's logits overflow on an input); one
containing "EOS" is answered with its last word only (an output that stops before max_new_tokens).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Generator

from deploylm.decoding.options import DecodingOptions
from deploylm.errors import Interrupted, NumericalOverflow, UsageError
from deploylm.generator import TextStream


@dataclass(frozen=True)
class Sequence:
    text: str
    token_ids: list[int]
    score: float


@dataclass(frozen=True)
class Result:
    prompt: str
    sequences: list[Sequence]


class FakeGenerator:
    """Answers each prompt with its words reversed, one word per "token"; records every call."""

    def __init__(self, *, delay: float = 0.0, step_delay: float = 0.0) -> None:
        self.delay, self.step_delay = delay, step_delay
        self.calls: list[tuple[list[str], dict[str, Any]]] = []
        self.stream_steps = 0          # pieces produced by stream(), all calls together
        self.streams_closed = 0        # stream() generators that ended (finished or closed)
        self._lock = threading.Lock()

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def generate(self, prompts: str | list[str], *, stop: threading.Event | None = None,
                 **options: Any) -> list[Result]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        opts = DecodingOptions.from_mapping(options)
        with self._lock:
            self.calls.append((prompts, dict(options)))
            if any("BOOM" in p for p in prompts):
                raise RuntimeError("scripted backend failure")
            bad = [i for i, p in enumerate(prompts) if "BAD" in p]
            if bad:   # numbered in this call, from 1, as the real Generator numbers the prompts it refuses
                raise UsageError(f"prompt {bad[0] + 1} contains BAD: scripted refusal")
            if any("NAN" in p for p in prompts):   # the whole call stops, as the real search does
                raise NumericalOverflow("the model's logits at generated token 1 are NaN or infinite: scripted")
            ends = time.monotonic() + self.delay          # a decode of `delay` seconds, in 10 ms steps
            while time.monotonic() < ends:
                time.sleep(min(0.01, max(0.0, ends - time.monotonic())))
                if stop is not None and stop.is_set():    # as Generator.generate: stop after the step
                    raise Interrupted("decoding stopped before its end: the caller asked")
            return [self._answer(p, opts) for p in prompts]

    def stream(self, prompt: str, *, stop: threading.Event | None = None, **options: Any) -> TextStream:
        opts = DecodingOptions.from_mapping(options)
        return TextStream(self._stream(self._answer(prompt, opts).sequences[0], opts.max_new_tokens, stop))

    @staticmethod
    def finish_reason(token_ids: list[int], max_new_tokens: int) -> str:
        return "stop" if len(token_ids) < max_new_tokens else "length"      # the fake has no end token

    def _stream(self, best: Sequence, max_new_tokens: int,
                stop: threading.Event | None = None) -> Generator[str, None, str]:
        try:
            for word in best.text.split(" ")[1:]:
                with self._lock:
                    time.sleep(self.step_delay)
                    self.stream_steps += 1
                if stop is not None and stop.is_set():    # as Generator.stream: stop after the step
                    raise Interrupted("decoding stopped before its end: the caller asked")
                yield " " + word
        finally:
            self.streams_closed += 1
        return self.finish_reason(best.token_ids, max_new_tokens)

    @staticmethod
    def _answer(prompt: str, opts: DecodingOptions) -> Result:
        words = list(reversed(prompt.split()))
        words = (words * opts.max_new_tokens)[:1 if "EOS" in prompt else opts.max_new_tokens]
        seqs = []
        for i in range(opts.num_return_sequences):
            ids = [len(w) + 7 * i + opts.num_beams for w in words]
            seqs.append(Sequence(" " + " ".join(words) + "!" * i, ids, -0.5 * len(ids) - i))
        return Result(prompt, seqs)
