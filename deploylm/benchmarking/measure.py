"""One timed round of one row: what a call costs, step by step.

A call is what a user pays for one batch: tokenize, search, detokenize. Its wall time is the latency
of every request in the batch. Inside it we time:
- time to first token: call start -> the first token of every row chosen (prefill + first step);
- each later step (reorder + decode + search step), from the decoder's per-step callback
  (SearchStats.on_step through Generator.generate(stats=...)), or for
  `transformers.generate` from a stopping criterion it calls once per step;
- time inside model calls: the backend calls the decode loop makes (SearchStats), or the model's
  forward passes inside `generate` (forward hooks). loop - model = the decoder's own overhead.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from deploylm.errors import UsageError, renumbered

Clock = Callable[[], float]


@dataclass(frozen=True)
class CallTiming:
    """Seconds spent in one call (one batch)."""

    wall_s: float                   # tokenize + search + detokenize
    ttft_s: float                   # call start -> first token chosen
    step_s: tuple[float, ...]       # every later step
    model_s: float                  # inside backend / model forward calls
    loop_s: float                   # inside the decode loop (model_s included)
    steps: int                      # decode loop steps (tokens per row)
    requests: int = 1               # prompts in the call; each waits wall_s

    @property
    def decoder_s(self) -> float:
        return self.loop_s - self.model_s


@dataclass(frozen=True)
class RoundResult:
    """One pass over the workload by one row: its calls and the best sequence per prompt."""

    calls: tuple[CallTiming, ...]
    token_ids: tuple[tuple[int, ...], ...]   # generated tokens only, one tuple per prompt

    @property
    def wall_s(self) -> float:
        return sum(c.wall_s for c in self.calls)

    @property
    def tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else float("inf")

    @property
    def decoder_ms_per_step(self) -> float:
        steps = sum(c.steps for c in self.calls)
        return 1e3 * sum(c.decoder_s for c in self.calls) / steps if steps else 0.0

    @property
    def decoder_pct(self) -> float:
        """The decoder's own time as a share of the decode loop's time (model calls + decoder)."""
        loop = sum(c.loop_s for c in self.calls)
        return 100.0 * sum(c.decoder_s for c in self.calls) / loop if loop > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"calls": [{**c.__dict__, "step_s": list(c.step_s)} for c in self.calls],
                "token_ids": [list(t) for t in self.token_ids]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RoundResult":
        calls = tuple(CallTiming(**{**c, "step_s": tuple(c["step_s"])}) for c in data["calls"])
        return cls(calls, tuple(tuple(t) for t in data["token_ids"]))


def timing_from_marks(start: float, marks: list[float], end: float, model_s: float, loop_s: float,
                      requests: int) -> CallTiming:
    """A CallTiming from the call's start, the clock after each step, and its end."""
    if not marks:
        return CallTiming(end - start, end - start, (), model_s, loop_s, 0, requests)
    steps = tuple(b - a for a, b in zip(marks, marks[1:]))
    return CallTiming(end - start, marks[0] - start, steps, model_s, loop_s, len(marks), requests)


def run_round(call: Callable[[list[str]], tuple[CallTiming, list[tuple[int, ...]]]],
              batches: Iterable[tuple[str, ...]], numbers: tuple[tuple[int, ...], ...] = ()) -> RoundResult:
    """One pass over the workload's batches with `call` (one timed call per batch). numbers: per batch, each
    prompt's number in the prompt list, which a refusal of "prompt N" (N counted within its call) is given."""
    calls, tokens = [], []
    for k, texts in enumerate(batches):
        with _numbered(numbers, k):
            timing, best = call(list(texts))
        calls.append(timing)
        tokens.extend(best)
    return RoundResult(tuple(calls), tuple(tokens))


@contextmanager
def _numbered(numbers: tuple[tuple[int, ...], ...], k: int) -> Iterator[None]:
    """A refusal of "prompt N" in the workload's call `k` names that prompt's number in the prompt list."""
    try:
        yield
    except UsageError as exc:
        listed = numbers[k] if k < len(numbers) else ()
        raise renumbered(exc, lambda n: listed[n - 1] if 1 <= n <= len(listed) else None) from None


class GeneratorRunner:
    """A row run by deploylm's own decoder: `deploylm.load(src, backend)` and the decode loop."""

    def __init__(self, src: str, backend: str, workload: Any, clock: Clock = time.perf_counter,
                 spin: bool = False) -> None:
        from deploylm.generator import load

        started = clock()
        threads = {"threads": workload.threads} if backend == "onnx" else {}   # torch's are set for the process
        self.generator = load(src, backend=backend, spin=spin, **threads)
        self.load_s = clock() - started
        self.rss_after_load_mib: float | None = None
        self.workload, self.clock = workload, clock

    def ready(self) -> None:
        """Refuse what the row cannot run (a prompt over the model's window, or over a TensorRT engine's lengths)
        once the rows are loaded, before any row's warm-up: not at this row's first call, after the rows before it
        have decoded the workload."""
        from deploylm.decoding.options import call_keywords

        options = call_keywords(self.workload.options)      # what _call passes
        for k, texts in enumerate(self.workload.batches):
            with _numbered(self.workload.numbers, k):
                self.generator.check(list(texts), **options)

    def run(self) -> RoundResult:
        return run_round(self._call, self.workload.batches, self.workload.numbers)

    def _call(self, texts: list[str]) -> tuple[CallTiming, list[tuple[int, ...]]]:
        """One Generator.generate call (encode, decode loop, detokenize), the clock read after each step."""
        from deploylm.decoding.options import call_keywords
        from deploylm.decoding.search import SearchStats

        clock, marks = self.clock, []
        stats = SearchStats(on_step=lambda: marks.append(clock()))
        start = clock()
        results = self.generator.generate(texts, stats=stats, **call_keywords(self.workload.options))
        end = clock()
        best = [tuple(int(t) for t in r.sequences[0].token_ids) for r in results]
        return timing_from_marks(start, marks, end, stats.backend_seconds, stats.total_seconds,
                                 len(texts)), best

    def close(self) -> float | None:
        return None


class TransformersRunner:
    """The reference row: `transformers.generate` on the original model, fp32, same options."""

    def __init__(self, src: str, workload: Any, clock: Clock = time.perf_counter) -> None:
        import torch

        from deploylm.models import hf
        from deploylm.models.source import resolve_source
        from deploylm.models.tokenizer import load_tokenizer, pad_like_the_model

        started = clock()
        source = resolve_source(src)
        self.model = hf.load_hf_model(source, dtype=torch.float32, device=torch.device("cpu"))
        self.tokenizer = load_tokenizer(source)
        self.special = hf.special_tokens(self.model)
        pad_like_the_model(self.tokenizer, self.special)
        self.load_s = clock() - started
        self.rss_after_load_mib: float | None = None
        self.workload, self.clock = workload, clock
        self._model_s, self._entered, self._depth = 0.0, 0.0, 0
        # generate() runs an encoder-decoder's encoder by itself (not through model.forward): hook it too,
        # or its time would count as the decoder's overhead. Nested calls count once (depth).
        modules = [self.model] + ([self.model.get_encoder()] if self.model.config.is_encoder_decoder else [])
        for module in modules:
            module.register_forward_pre_hook(self._enter)
            module.register_forward_hook(self._leave)

    def _enter(self, *_: Any) -> None:
        if self._depth == 0:
            self._entered = self.clock()
        self._depth += 1

    def _leave(self, *_: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._model_s += self.clock() - self._entered

    def generate_kwargs(self) -> dict[str, Any]:
        """transformers' names for the workload's options (beam search or greedy, never sampling)."""
        o = self.workload.options
        return dict(num_beams=o.num_beams, max_new_tokens=o.max_new_tokens, min_new_tokens=o.min_new_tokens,
                    length_penalty=o.length_penalty, early_stopping=o.early_stopping,
                    repetition_penalty=o.repetition_penalty, no_repeat_ngram_size=o.no_repeat_ngram_size,
                    num_return_sequences=1, do_sample=False, pad_token_id=self.special.pad_token_id)

    def run(self) -> RoundResult:
        return run_round(self._call, self.workload.batches, self.workload.numbers)

    def _call(self, texts: list[str]) -> tuple[CallTiming, list[tuple[int, ...]]]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        clock, marks = self.clock, []

        class Mark(StoppingCriteria):          # called once per step; never stops anything
            def __call__(self, input_ids: Any, scores: Any, **_: Any) -> Any:
                marks.append(clock())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        enc_dec = bool(self.model.config.is_encoder_decoder)
        start = clock()
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="right" if enc_dec else "left")
        self._model_s = 0.0
        entered = clock()
        with torch.inference_mode():
            out = self.model.generate(**enc, **self.generate_kwargs(), stopping_criteria=StoppingCriteriaList([Mark()]))
        loop_s = clock() - entered                                                        # out [B, P + new]
        best = cut_at_eos(out[:, 1 if enc_dec else enc["input_ids"].shape[1]:].tolist(), self.special.eos_token_ids)
        self.tokenizer.batch_decode([list(t) for t in best], skip_special_tokens=True)
        end = clock()
        return timing_from_marks(start, marks, end, self._model_s, loop_s, len(texts)), best

    def close(self) -> float | None:
        return None


def cut_at_eos(rows: Iterable[list[int]], eos: Iterable[int]) -> list[tuple[int, ...]]:
    """Each row up to and including its first EOS (the padding after it dropped)."""
    stop = set(eos)
    out = []
    for row in rows:
        end = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
        out.append(tuple(int(t) for t in row[:end]))
    return out


def open_local_runner(spec: Any, workload: Any, clock: Clock = time.perf_counter) -> Any:
    """The in-process runner for a RowSpec."""
    if spec.is_reference:
        return TransformersRunner(spec.src, workload, clock)
    return GeneratorRunner(spec.src, spec.backend, workload, clock, spin=spec.spin)
