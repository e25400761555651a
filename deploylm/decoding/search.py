"""The one decode loop: beam search, greedy or sampling over any Backend.

`iter_search` is a generator that yields a StepEvent after every step (streaming needs no threads)
and returns the hypotheses; `generate_ids` drains it. Semantics are transformers 5's `generate()`
(DESIGN.md §5); the step logic lives in beam.py (beam search, beam sampling) and sample.py (greedy,
sampling). The decoder knows only the Backend protocol and keeps tensors on `backend.device`.

Sampling draws from a `torch.Generator` seeded with `options.seed` (a fresh random seed when None), never
from torch's global RNG: outputs are reproducible per seed. transformers draws from the global RNG; on
CPU, `torch.manual_seed(seed)` before its `generate()` gives the same draws as ours with `seed` (tested;
we list them best score first, transformers in draw order). Greedy and beam search are token-identical.
"""
from __future__ import annotations

import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Generator

import torch
from torch import Tensor

from deploylm.backends.base import Backend, EncodedBatch, ModelInfo
from deploylm.decoding.beam import BeamSearch
from deploylm.decoding.options import DecodingOptions
from deploylm.decoding.processors import build_processors
from deploylm.decoding.sample import SampleSearch
from deploylm.decoding.threads import for_logits as step_threads
from deploylm.errors import Interrupted, UsageError


@dataclass(frozen=True)
class Hypothesis:
    """One returned sequence: generated token ids only (EOS included when produced) and its score."""

    token_ids: tuple[int, ...]
    score: float


@dataclass
class SearchStats:
    """Where the time went: `total_seconds` inside the loop, of which `backend_seconds` in backend calls.

    `on_step` (optional) is called after every step, outside the timed part (`deploylm bench` reads its
    clock there). On CUDA, backend calls may return before their kernels finish, so part of the backend's
    time can show up as decoder time; synchronize in the backend if exact attribution matters.
    """

    steps: int = 0
    backend_calls: int = 0
    backend_seconds: float = 0.0
    total_seconds: float = 0.0
    on_step: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    @property
    def decoder_seconds(self) -> float:
        return self.total_seconds - self.backend_seconds


class StepEvent:
    """The search after one step; `done` and `candidates` are computed only when read, so a loop that
    does not stream pays nothing for them. Read them before resuming the search (they describe the
    current step; reading a stale event raises RuntimeError).

    step:       number of generated tokens so far (t).
    done:       [B] bool, the input's hypotheses can no longer change.
    candidates: (ids [B, C, t], lengths [B, C], valid [B, C]) the token prefixes one of which every
                final best hypothesis starts with (live beams/draws and the best finished one).
    """

    __slots__ = ("step", "_search", "_done", "_candidates")

    def __init__(self, step: int, search: "BeamSearch | SampleSearch"):
        self.step = step
        self._search = search
        self._done: Tensor | None = None
        self._candidates: tuple[Tensor, Tensor, Tensor] | None = None

    def __repr__(self) -> str:
        return f"StepEvent(step={self.step})"

    def _current(self) -> "BeamSearch | SampleSearch":
        if self._search.cur_len - self._search.P != self.step:
            raise RuntimeError(f"StepEvent of step {self.step} read after the search moved on: read it "
                               "before resuming the search")
        return self._search

    @property
    def done(self) -> Tensor:
        search = self._current()
        if self._done is None:
            self._done = search.input_done()
        return self._done

    @property
    def candidates(self) -> tuple[Tensor, Tensor, Tensor]:
        search = self._current()
        if self._candidates is None:
            self._candidates = search.candidates()
        return self._candidates

    def live_token_ids(self, index: int) -> list[tuple[int, ...]]:
        """The candidate token sequences of input `index`."""
        ids, lengths, valid = (t[index].tolist() for t in self.candidates)
        return [tuple(row[:n]) for row, n, ok in zip(ids, lengths, valid) if ok]


def running_prompt(batch: EncodedBatch, info: ModelInfo) -> Tensor:
    """[B, P] what transformers' loop starts from: the left-padded prompt, or the decoder start token."""
    if not info.is_encoder_decoder:
        return batch.input_ids
    start = info.special.decoder_start_token_id
    if start is None:
        raise UsageError(f"model {info.name!r} is encoder-decoder but has no decoder_start_token_id")
    return torch.full((batch.batch_size, 1), start, dtype=torch.long, device=batch.input_ids.device)


def _left_padding(batch: EncodedBatch, info: ModelInfo, rows_per_input: int) -> Tensor | None:
    """[R] left-padding length per row (decoder-only with padding), as transformers' repetition penalty uses."""
    if info.is_encoder_decoder or bool((batch.attention_mask == 1).all()):
        return None
    pads = (batch.attention_mask != 0).int().argmax(dim=1)
    return pads.repeat_interleave(rows_per_input)


def make_search(options: DecodingOptions, info: ModelInfo, batch: EncodedBatch,
                device: torch.device) -> BeamSearch | SampleSearch:
    """The step object for `options` (beam search/sampling when num_beams > 1, else greedy/sampling)."""
    prompt = running_prompt(batch, info)
    rows = options.rows_per_input
    processors = build_processors(options, info, prompt.shape[1], _left_padding(batch, info, rows), device,
                                  encoder_input_ids=batch.input_ids)
    generator = None
    if options.do_sample:
        generator = torch.Generator(device=device)
        if options.seed is None:
            generator.seed()
        else:
            generator.manual_seed(options.seed)
    eos, pad = tuple(info.special.eos_token_ids), info.special.pad_token_id
    if options.num_beams > 1:
        return BeamSearch(options, prompt, eos, pad, processors, generator)
    return SampleSearch(options, prompt, eos, pad, processors, generator)


def iter_search(backend: Backend, batch: EncodedBatch, options: DecodingOptions,
                stats: SearchStats | None = None) -> Generator[StepEvent, None, list[list[Hypothesis]]]:
    """Run the search, yielding a StepEvent after each step; returns per input the best
    `num_return_sequences` hypotheses, best first. `stats` (optional) is filled in as it runs."""
    if batch.batch_size == 0:
        raise UsageError("no prompts to generate from: the batch is empty")
    batch = batch.to(backend.device)
    search = make_search(options, backend.info, batch, backend.device)
    return (yield from run_search(backend, batch, search, options, stats))


def run_search(backend: Backend, batch: EncodedBatch, search: BeamSearch | SampleSearch,
               options: DecodingOptions, stats: SearchStats | None = None
               ) -> Generator[StepEvent, None, list[list[Hypothesis]]]:
    """The decode loop: prefill, expand rows, then step / reorder / decode until every input is done."""
    stats = stats if stats is not None else SearchStats()
    resumed = time.perf_counter()

    def call(fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        stats.backend_seconds += time.perf_counter() - start
        stats.backend_calls += 1
        return out

    started = time.time()
    logits, state = call(backend.prefill, batch)                                      # [B, V]
    _check_logits(backend, "prefill", logits, batch.batch_size)
    rows = options.rows_per_input
    if rows > 1:
        expand = torch.arange(batch.batch_size, device=backend.device).repeat_interleave(rows)
        state = call(backend.reorder, state, expand)
        logits = logits.repeat_interleave(rows, dim=0)                                 # [R, V]
    threads = step_threads(logits)                          # CPU: thread counts per step (decoding/threads.py)
    if threads is not None:
        search.vocab_threads = threads.vocab
    while True:
        time_up = options.max_time is not None and time.time() - started > options.max_time
        with threads.step() if threads is not None else nullcontext():
            parents, tokens = search.step(logits, time_up)
        stats.steps += 1
        stats.total_seconds += time.perf_counter() - resumed
        if stats.on_step is not None:
            stats.on_step()
        yield StepEvent(search.cur_len - search.P, search)
        resumed = time.perf_counter()
        if search.all_done:
            break
        if parents is not None:
            state = call(backend.reorder, state, parents)
        logits, state = call(backend.decode, tokens, state)                           # [R, V]
        _check_logits(backend, "decode", logits, tokens.shape[0])
    result = [[Hypothesis(ids, score) for ids, score in hyps]
              for hyps in search.result(options.num_return_sequences)]
    stats.total_seconds += time.perf_counter() - resumed
    return result


def _check_logits(backend: Backend, call: str, logits: Tensor, rows: int) -> None:
    """A backend's logits are [rows, info.vocab_size] (the Backend protocol): a custom backend that returns
    every position's logits, or fewer columns than its ModelInfo says, is an error, not a silently wrong search."""
    vocab = backend.info.vocab_size
    if not isinstance(logits, Tensor) or tuple(logits.shape) != (rows, vocab):
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise RuntimeError(f"backend {backend.name!r}: {call} returned logits {shape}, expected [{rows}, {vocab}] "
                           f"(one row per batch row, info.vocab_size={vocab} columns: the last position's logits)")


STOPPED = "decoding stopped before its end: the caller asked (a server shutting down, or every client of the request gone)"


def generate_ids(backend: Backend, batch: EncodedBatch, options: DecodingOptions,
                 stats: SearchStats | None = None, stop: threading.Event | None = None) -> list[list[Hypothesis]]:
    """Per input, `num_return_sequences` hypotheses, best first (drains `iter_search`).

    stop: anything with `is_set()` (a threading.Event); once set, the search ends after the step in
    progress, or before its first step, and Interrupted is raised (a server's shutdown, or a batch whose
    clients all left: the call's result would reach nobody)."""
    if stop is not None and stop.is_set():     # set while this call waited (for the model, in a queue)
        raise Interrupted(STOPPED)
    events = iter_search(backend, batch, options, stats)
    while True:
        try:
            next(events)
        except StopIteration as done:
            return done.value
        if stop is not None and stop.is_set():
            events.close()
            raise Interrupted(STOPPED)
