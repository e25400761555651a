"""Greedy, sampling, batching and the loop's bookkeeping, on scripted backends (no model)."""
from __future__ import annotations

import math

import pytest
import torch

from deploylm.decoding.beam import BeamSearch
from deploylm.decoding.options import DecodingOptions
from deploylm.decoding.processors import build_processors
from deploylm.decoding.search import SearchStats, generate_ids, iter_search, run_search
from deploylm.decoding.threads import torch_threads
from deploylm.errors import DeployLMError, NumericalOverflow, UsageError
from tests.helpers import scripted_backend
from tests.helpers.scripted_backend import ScriptedBackend, encode, table_script

PAD, EOS = 0, 1
VOCAB = 6


def random_script(eos_weight: float = 0.6, peak: float = 0.0):
    return scripted_backend.random_script(VOCAB, eos_weight=eos_weight, peak=peak)


PROMPTS = [(2, 3, 4), (5,), (3, 3), (4, 2, 5, 3, 2)]


@pytest.mark.parametrize("options", [
    dict(num_beams=3, max_new_tokens=6),
    dict(num_beams=3, max_new_tokens=6, length_penalty=0.0, early_stopping="never", num_return_sequences=2),
    dict(num_beams=2, max_new_tokens=6, early_stopping=True, no_repeat_ngram_size=2),
    dict(num_beams=1, max_new_tokens=6),
])
def test_batch_of_different_lengths_equals_one_prompt_at_a_time(options):
    opts = DecodingOptions(**options)
    backend = ScriptedBackend(random_script(), vocab_size=VOCAB)
    batched = generate_ids(backend, encode(PROMPTS), opts)
    alone = [generate_ids(backend, encode([p]), opts)[0] for p in PROMPTS]
    assert batched == alone
    assert any(h.token_ids[-1] == EOS for per_input in batched for h in per_input)


def test_a_set_stop_event_ends_the_search_before_its_next_step():
    import threading

    from deploylm.errors import Interrupted

    backend = ScriptedBackend(random_script(), vocab_size=VOCAB)
    steps = []
    decode = backend.decode
    backend.decode = lambda tokens, state: (steps.append(1), decode(tokens, state))[1]
    stop = threading.Event()
    options = DecodingOptions(num_beams=2, max_new_tokens=6, min_new_tokens=6)
    generate_ids(backend, encode(PROMPTS), options, stop=stop)                     # not set: runs to the end
    assert len(steps) == 5
    steps.clear()
    prefills = []
    prefill = backend.prefill
    backend.prefill = lambda *a, **k: (prefills.append(1), prefill(*a, **k))[1]
    stop.set()                          # set while the call waited (a batch queued behind a stream)
    with pytest.raises(Interrupted, match="decoding stopped before its end"):
        generate_ids(backend, encode(PROMPTS), options, stop=stop)
    assert steps == [] and prefills == []

    class SetAfterTwoSteps:             # set during the search: it ends after the step in progress
        def is_set(self):
            return len(steps) >= 2

    with pytest.raises(Interrupted):
        generate_ids(backend, encode(PROMPTS), options, stop=SetAfterTwoSteps())
    assert len(steps) == 2


def _beam_one(backend, batch, options):
    """Beam search with a single beam (generate_ids would run greedy for num_beams=1)."""
    info = backend.info
    search = BeamSearch(options, batch.input_ids, info.special.eos_token_ids, PAD,
                        build_processors(options, info, batch.input_ids.shape[1]))
    events = run_search(backend, batch, search, options)
    while True:
        try:
            next(events)
        except StopIteration as stop:
            return stop.value


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_greedy_equals_beam_search_with_one_beam(length_penalty):
    backend = ScriptedBackend(random_script(), vocab_size=VOCAB)
    options = DecodingOptions(num_beams=1, max_new_tokens=8, early_stopping=True, length_penalty=length_penalty,
                              min_new_tokens=2, no_repeat_ngram_size=2)
    batch = encode(PROMPTS)
    greedy = generate_ids(backend, batch, options)
    beam = _beam_one(backend, batch, options)
    assert [[h.token_ids for h in x] for x in greedy] == [[h.token_ids for h in x] for x in beam]
    for g, b in zip(greedy, beam):
        assert g[0].score == pytest.approx(b[0].score, rel=1e-5)


def test_greedy_pads_finished_rows_and_stops_each_at_eos():
    table = {(): [0, .1, .6, .3, 0, 0], (2,): [0, .7, .2, .1, 0, 0]}
    backend = ScriptedBackend(table_script(table, [0, .2, .3, .5, 0, 0]), vocab_size=VOCAB)
    out = generate_ids(backend, encode([(2,), (3, 3)]), DecodingOptions(num_beams=1, max_new_tokens=4))
    assert [[h.token_ids for h in x] for x in out] == [[(2, EOS)], [(2, EOS)]]
    assert out[0][0].score == pytest.approx((torch.tensor([.6, .7]).log().sum() / 2).item(), rel=1e-5)
    assert [name for name, _ in backend.calls] == ["prefill", "decode"]     # stopped when both finished


def test_sampling_is_reproducible_per_seed_and_leaves_global_rng_alone():
    backend = ScriptedBackend(random_script(eos_weight=0.05), vocab_size=VOCAB)
    batch = encode(PROMPTS)
    options = DecodingOptions(num_beams=1, do_sample=True, seed=7, max_new_tokens=8, num_return_sequences=3)
    rng_before = torch.get_rng_state()
    first = generate_ids(backend, batch, options)
    assert torch.equal(rng_before, torch.get_rng_state())
    assert generate_ids(backend, batch, options) == first
    assert generate_ids(backend, batch, options.replace(seed=8)) != first
    for per_input in first:
        assert len(per_input) == 3
        assert [h.score for h in per_input] == sorted((h.score for h in per_input), reverse=True)


def test_first_argmax_is_torch_argmax():
    """Greedy's chunked argmax returns torch.argmax's index on every row: random, tied (first occurrence
    wins), -inf everywhere, NaN, and vocabularies that chunk or do not (prime: torch's argmax itself)."""
    from deploylm.decoding.sample import first_argmax

    g = torch.Generator().manual_seed(0)
    for trial in range(400):
        V = [49152, 1000, 96, 97, 8][trial % 5]
        x = torch.randn(8, V, generator=g) * [0.01, 3, 30][trial % 3]
        if trial % 4 == 0:
            x = torch.round(x)                                         # ties, often across chunks
        if trial % 6 == 0:
            x[:, torch.randint(0, V, (V // 2,), generator=g)] = -float("inf")
        if trial % 9 == 0:
            x[2] = -float("inf")                                       # a row with every token banned
        if trial % 10 == 0:
            x[3, torch.randint(0, V, (2,), generator=g)] = float("nan")
        x[5, V - 1] = x[5].max() + 1                                   # the maximum in the last chunk
        assert torch.equal(first_argmax(x), torch.argmax(x, dim=-1)), trial


def test_sampling_with_top_k_1_equals_greedy():
    backend = ScriptedBackend(random_script(), vocab_size=VOCAB)
    batch = encode(PROMPTS)
    greedy = generate_ids(backend, batch, DecodingOptions(num_beams=1, max_new_tokens=8))
    sampled = generate_ids(backend, batch, DecodingOptions(num_beams=1, max_new_tokens=8, do_sample=True,
                                                           top_k=1, seed=3))
    assert [[h.token_ids for h in x] for x in sampled] == [[h.token_ids for h in x] for x in greedy]


def test_beam_sampling_is_reproducible_and_returns_sorted_beams():
    backend = ScriptedBackend(random_script(), vocab_size=VOCAB)
    options = DecodingOptions(num_beams=3, do_sample=True, seed=1, temperature=0.7, top_p=0.9,
                              max_new_tokens=6, num_return_sequences=3)
    out = generate_ids(backend, encode(PROMPTS), options)
    assert out == generate_ids(backend, encode(PROMPTS), options)
    for per_input in out:
        assert [h.score for h in per_input] == sorted((h.score for h in per_input), reverse=True)


def test_stats_and_events_count_steps_and_backend_time():
    backend = ScriptedBackend(random_script(), vocab_size=VOCAB)
    stats = SearchStats()
    events = iter_search(backend, encode(PROMPTS), DecodingOptions(num_beams=2, max_new_tokens=5), stats)
    seen = []
    while True:
        try:
            seen.append(next(events))
        except StopIteration:
            break
    assert [e.step for e in seen] == list(range(1, len(seen) + 1))
    assert bool(seen[-1].done.all()) and stats.steps == len(seen)
    assert stats.backend_calls == len(backend.calls)
    assert 0 < stats.backend_seconds <= stats.total_seconds
    assert stats.decoder_seconds >= 0


def test_encoder_decoder_starts_from_the_decoder_start_token():
    seen_prompts = []

    def script(prompt, generated):
        seen_prompts.append(prompt)
        return [0, .5, .5, 0, 0, 0] if generated else [0, .1, .1, .8, 0, 0]

    backend = ScriptedBackend(script, vocab_size=VOCAB, is_encoder_decoder=True, decoder_start_token_id=0)
    # the decoder start token (0, also pad) is part of the running sequence: penalized like any token
    out = generate_ids(backend, encode([(4, 5)], left=False),
                       DecodingOptions(num_beams=2, max_new_tokens=2, repetition_penalty=2.0))
    assert out[0][0].token_ids[0] == 3 and seen_prompts[0] == (4, 5)


def test_errors_name_the_problem():
    backend = ScriptedBackend(random_script(), vocab_size=VOCAB, is_encoder_decoder=True)
    with pytest.raises(UsageError, match="decoder_start_token_id"):
        generate_ids(backend, encode([(2,)]), DecodingOptions())
    empty = encode([(2,)])
    empty = type(empty)(empty.input_ids[:0], empty.attention_mask[:0])
    with pytest.raises(UsageError, match="empty"):
        generate_ids(ScriptedBackend(random_script(), vocab_size=VOCAB), empty, DecodingOptions())


@pytest.mark.parametrize("num_beams", [1, 3])
def test_max_time_stops_every_row_and_returns_what_it_has(num_beams):
    import time

    class Slow(ScriptedBackend):
        def decode(self, tokens, state):
            time.sleep(0.05)
            return super().decode(tokens, state)

    backend = Slow(random_script(eos_weight=0.0), vocab_size=VOCAB)
    options = DecodingOptions(num_beams=num_beams, max_new_tokens=50, max_time=0.12,
                              num_return_sequences=num_beams)
    out = generate_ids(backend, encode(PROMPTS), options)
    lengths = {len(h.token_ids) for per_input in out for h in per_input}
    assert len(lengths) == 1 and 1 < lengths.pop() < 10


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_ids_never_computes_the_streaming_views(monkeypatch, num_beams):
    from deploylm.decoding import beam, sample

    def boom(self):
        raise AssertionError("computed although nobody streams")

    for cls in (beam.BeamSearch, sample.SampleSearch):
        monkeypatch.setattr(cls, "candidates", boom)
        monkeypatch.setattr(cls, "input_done", boom)
    backend = ScriptedBackend(random_script(), vocab_size=VOCAB)
    assert generate_ids(backend, encode(PROMPTS), DecodingOptions(num_beams=num_beams, max_new_tokens=5))


def test_a_step_event_is_read_before_the_search_moves_on():
    backend = ScriptedBackend(random_script(eos_weight=0.0), vocab_size=VOCAB)
    events = iter_search(backend, encode(PROMPTS), DecodingOptions(num_beams=2, max_new_tokens=4))
    first = next(events)
    assert first.live_token_ids(0) and first.done.shape == (len(PROMPTS),)
    assert first.candidates is first.candidates                       # computed once per event
    second = next(events)
    with pytest.raises(RuntimeError, match="read after the search moved on"):
        first.live_token_ids(0)
    assert all(len(ids) == 2 for ids in second.live_token_ids(0))


def test_on_step_is_called_once_per_step_outside_the_timed_loop(monkeypatch):
    from deploylm.decoding import search

    now = [0.0]

    def clock():   # a fake perf_counter: 1 s per read, 1000 s inside each on_step
        now[0] += 1.0
        return now[0]

    monkeypatch.setattr(search.time, "perf_counter", clock)
    backend = ScriptedBackend(random_script(eos_weight=0.0), vocab_size=VOCAB)
    calls = []
    stats = SearchStats(on_step=lambda: (calls.append(stats.steps), now.__setitem__(0, now[0] + 1000.0)))
    generate_ids(backend, encode(PROMPTS), DecodingOptions(num_beams=2, max_new_tokens=4), stats)
    assert calls == [1, 2, 3, 4] and stats.steps == 4
    assert 0 < stats.total_seconds < 1000.0                             # on_step's time is not loop time


def test_generator_generate_fills_stats(tiny_gpt2_dir):
    from deploylm.generator import load

    stats = SearchStats()
    results = load(tiny_gpt2_dir).generate(["hello world", "the quick"], stats=stats, num_beams=2, max_new_tokens=3)
    assert len(results) == 2 and stats.steps == 3 and stats.backend_calls >= 4
    assert 0 < stats.backend_seconds <= stats.total_seconds


@pytest.mark.parametrize("num_beams", [1, 3])
def test_search_steps_run_on_one_thread_and_backend_calls_on_the_process_threads(monkeypatch, num_beams):
    """Issue 7: the step's ops run single-threaded on CPU (no OpenMP waits when cores are shared); the
    backend's calls and the caller keep the process's thread count."""
    from deploylm.decoding import beam, sample

    seen = {"step": set(), "backend": set()}
    for cls in (beam.BeamSearch, sample.SampleSearch):
        step = cls.step

        def counted(self, *args, _step=step, **kwargs):
            seen["step"].add(torch.get_num_threads())
            return _step(self, *args, **kwargs)

        monkeypatch.setattr(cls, "step", counted)
    backend = ScriptedBackend(random_script(), vocab_size=VOCAB)
    decode = backend.decode

    def counted_decode(*args, **kwargs):
        seen["backend"].add(torch.get_num_threads())
        return decode(*args, **kwargs)

    monkeypatch.setattr(backend, "decode", counted_decode)
    with torch_threads(2):
        generate_ids(backend, encode(PROMPTS), DecodingOptions(num_beams=num_beams, max_new_tokens=5))
        assert seen == {"step": {1}, "backend": {2}} and torch.get_num_threads() == 2


@pytest.mark.parametrize("num_beams", [1, 2])
def test_sampling_with_every_token_banned_is_a_usage_error(num_beams):
    """With 6 tokens, a 1-gram ban and EOS banned until 8 tokens, step 5 has nothing left to draw: one
    UsageError naming the step and the prompt, not torch.multinomial's RuntimeError from deep inside."""
    backend = ScriptedBackend(random_script(), vocab_size=VOCAB)
    options = DecodingOptions(num_beams=num_beams, do_sample=True, seed=0, max_new_tokens=8, min_new_tokens=8,
                              no_repeat_ngram_size=1)
    with pytest.raises(UsageError, match=r"nothing left to sample at generated token \d+ of prompt 1: the options "
                                         r"ban every token"):   # counted from 1, as "prompt 1 is empty"
        generate_ids(backend, encode([(2,)]), options)
    relaxed = DecodingOptions(num_beams=num_beams, do_sample=True, seed=0, max_new_tokens=8, no_repeat_ngram_size=1)
    assert generate_ids(backend, encode([(2,)]), relaxed)[0]          # EOS may end it: a draw is always there


def test_beam_sampling_with_one_token_to_draw_returns_repeats_scored_near_minus_1e9():
    """docs/decoding.md (Ranges): beam sampling that keeps 6 candidates where one token has all the probability
    also draws zero-probability candidates of the beams not yet started (running score -1e9), as transformers'
    does; they grow into repeats of the best output, scored -1e9 / 4 tokens."""
    backend = ScriptedBackend(table_script({}, [0, .3, .6, .05, .05]), vocab_size=5)
    options = DecodingOptions(num_beams=3, num_return_sequences=3, do_sample=True, seed=0, temperature=1e-6,
                              max_new_tokens=4)
    [hyps] = generate_ids(backend, encode([(2,)]), options)
    assert [h.token_ids for h in hyps] == [(2, 2, 2, 2)] * 3
    assert hyps[0].score == pytest.approx(4 * math.log(.6) / 4 / 1e-6, rel=1e-4)    # log-probs / temperature
    assert [h.score for h in hyps[1:]] == pytest.approx([-1e9 / 4] * 2, rel=1e-2)


class _Overflowing(ScriptedBackend):
    """A model whose logits overflow (float16) at its second decode step: one token's logit is `value`."""

    def __init__(self, value: float, **kwargs):
        super().__init__(**kwargs)
        self.value, self.decodes = value, 0

    def decode(self, tokens, state):
        logits, state = super().decode(tokens, state)
        self.decodes += 1
        if self.decodes == 2:
            logits[:, 3] = self.value
        return logits, state


@pytest.mark.parametrize("num_beams", [1, 2])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_sampling_from_logits_that_overflowed_blames_the_model_not_the_options(num_beams, value):
    """NaN or +inf logits (a float16 overflow) were reported as "the options ban every token (no_repeat_ngram_size,
    min_new_tokens, ...)", to a call that gave none of them: the error now says it is the model's logits."""
    backend = _Overflowing(value, script=random_script(eos_weight=0.0), vocab_size=VOCAB)
    options = DecodingOptions(num_beams=num_beams, do_sample=True, seed=0, max_new_tokens=6)
    with pytest.raises(DeployLMError, match=r"^the model's logits at generated token 3 are NaN or infinite, so there "
                                            r"is nothing to sample from: a numerical overflow in the model") as caught:
        generate_ids(backend, encode([(2,)]), options)
    assert not isinstance(caught.value, UsageError)      # not the caller's input: HTTP 500, not 400


@pytest.mark.parametrize("num_beams, says", [(1, "there is no best token to pick"), (3, "the beams cannot be ranked")])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_greedy_and_beam_search_on_logits_that_overflowed_name_the_overflow(num_beams, says, value):
    """Greedy and beam search ran on through NaN logits: argmax and top-k rank a NaN first, so every row
    followed the overflowed token and came back scored NaN, with no word of why. Now the model is named."""
    backend = _Overflowing(value, script=random_script(eos_weight=0.0), vocab_size=VOCAB)
    options = DecodingOptions(num_beams=num_beams, max_new_tokens=6)
    with pytest.raises(DeployLMError, match=rf"^the model's logits at generated token 3 are NaN or infinite, so "
                                            rf"{says}: a numerical overflow in the model") as caught:
        generate_ids(backend, encode([(2,), (3, 4)]), options)
    assert isinstance(caught.value, NumericalOverflow) and caught.value.exit_code == 1   # not the caller's input


class _OverflowingOnceDone(ScriptedBackend):
    """Prompt (2,) ends at once (EOS 0.9, then 2 and 3 at 0.05); from its second generated token on, its
    rows' logits are NaN. They reach the search only for rows that can no longer change its answer."""

    def decode(self, tokens, state):
        logits, state = super().decode(tokens, state)
        for row, (prompt, generated) in enumerate(state):
            if prompt == (2,) and len(generated) >= 2:
                logits[row] = float("nan")
        return logits, state


@pytest.mark.parametrize("num_beams", [1, 2])
def test_nan_logits_of_rows_already_done_are_ignored(num_beams):
    """A finished greedy row, or the beams of an input whose answer is settled, still run through the model;
    NaN there changes nothing the caller gets back, so it is not an error."""
    def script(prompt, generated):
        if prompt == (2,):
            return [0, .9, .05, .05, 0, 0]
        return random_script(eos_weight=0.0)(prompt, generated)
    options = DecodingOptions(num_beams=num_beams, max_new_tokens=6)
    clean = generate_ids(ScriptedBackend(script, vocab_size=VOCAB), encode([(2,), (3, 4)]), options)
    assert generate_ids(_OverflowingOnceDone(script, vocab_size=VOCAB), encode([(2,), (3, 4)]), options) == clean
    assert len(clean[1][0].token_ids) == 6                  # the other input ran to the end past the NaN


class _Narrow(ScriptedBackend):
    """Logits with fewer columns than info.vocab_size (or every position's, at `call`): a custom backend's bug."""

    def __init__(self, call: str, shape: str, **kwargs):
        super().__init__(**kwargs)
        self.call, self.shape = call, shape

    def _wrong(self, out):
        logits, state = out
        return (logits[:, :-1] if self.shape == "narrow" else logits[:, None, :]), state

    def prefill(self, batch):
        out = super().prefill(batch)
        return self._wrong(out) if self.call == "prefill" else out

    def decode(self, tokens, state):
        out = super().decode(tokens, state)
        return self._wrong(out) if self.call == "decode" else out


@pytest.mark.parametrize("num_beams", [1, 2])
@pytest.mark.parametrize("shape", ["narrow", "every position"])
@pytest.mark.parametrize("call", ["prefill", "decode"])
def test_logits_of_the_wrong_shape_are_an_error_naming_the_backend_call(call, shape, num_beams):
    """Narrow logits were searched over silently (the missing tokens never chosen)."""
    backend = _Narrow(call, shape, script=random_script(eos_weight=0.0), vocab_size=VOCAB)
    with pytest.raises(RuntimeError, match=rf"backend 'scripted': {call} returned logits \(.*\), expected \[\d, {VOCAB}\]"):
        generate_ids(backend, encode(PROMPTS[:2]), DecodingOptions(num_beams=num_beams, max_new_tokens=3))


@pytest.mark.parametrize("num_beams", [1, 2])
def test_repetition_penalty_skips_the_left_padding_of_a_shorter_prompt(num_beams):
    """As transformers (prompt_ignore_length = padding lengths): the pad positions of a left-padded prompt are
    not earlier tokens. Here the pad id is token 2, which the model prefers; penalizing it (ln .45 * 2 < ln .25)
    would make the padded prompt (3,) end at once. Beams: rows of one input share its padding length."""
    table = {(): [0, .25, .45, .3]}
    backend = ScriptedBackend(table_script(table, [0, .25, .45, .3]), vocab_size=4)
    batch = encode([(3, 3, 3), (3,)], pad_token_id=2)
    out = generate_ids(backend, batch, DecodingOptions(num_beams=num_beams, max_new_tokens=1,
                                                       repetition_penalty=2.0))
    assert [[h.token_ids for h in per_input] for per_input in out] == [[(2,)], [(2,)]]
    assert out[1][0].score == pytest.approx(torch.tensor(.45).log().item(), rel=1e-5)


def test_top_k_larger_than_the_vocabulary_keeps_every_token():
    """transformers' TopKLogitsWarper caps top_k at the vocabulary: top_k=100 over 6 tokens changes nothing."""
    backend = ScriptedBackend(random_script(eos_weight=0.05), vocab_size=VOCAB)
    options = DecodingOptions(num_beams=1, do_sample=True, seed=4, max_new_tokens=6, num_return_sequences=2)
    assert generate_ids(backend, encode(PROMPTS), options.replace(top_k=100)) == \
        generate_ids(backend, encode(PROMPTS), options)


def test_sampling_does_not_fail_on_a_finished_row_whose_every_token_is_banned():
    """Prompt (2, 3, 4, 5) ends at once; with no_repeat_ngram_size=1 its row (EOS, then padding) has every token
    banned from the third step on, while prompt (2,) still samples: only an active row may raise."""
    def script(prompt, generated):
        return [0, .99, .0025, .0025, .0025, .0025] if prompt == (2, 3, 4, 5) else [0, 1e-6, .25, .25, .25, .25 - 1e-6]

    backend = ScriptedBackend(script, vocab_size=VOCAB)
    options = DecodingOptions(num_beams=1, do_sample=True, seed=0, max_new_tokens=3, no_repeat_ngram_size=1)
    out = generate_ids(backend, encode([(2, 3, 4, 5), (2,)]), options)
    assert out[0][0].token_ids == (EOS,) and len(out[1][0].token_ids) == 3


def test_a_sampled_input_is_done_only_when_every_draw_has_finished():
    backend = ScriptedBackend(random_script(eos_weight=0.6), vocab_size=VOCAB)
    options = DecodingOptions(num_beams=1, do_sample=True, seed=0, max_new_tokens=8, num_return_sequences=3)
    events = iter_search(backend, encode([(2, 3)]), options)
    done = []
    while True:
        try:
            done.append(next(events).done.tolist())
        except StopIteration as stop:
            hyps = stop.value[0]
            break
    assert len({len(h.token_ids) for h in hyps}) > 1           # the draws end at different steps
    assert done == [[False]] * (len(done) - 1) + [[True]] and len(done) == max(len(h.token_ids) for h in hyps)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_encoder_decoder_min_new_tokens_counts_from_the_start_token_not_the_source(num_beams):
    """The running sequence of an encoder-decoder is the start token plus the generated tokens: with
    min_new_tokens=2 EOS (every step's favourite) is allowed from the third token on, whatever the source's length."""
    table = {(): [0, .6, .3, .1, 0, 0], (2,): [0, .6, .1, .3, 0, 0]}
    backend = ScriptedBackend(table_script(table, [0, .6, .2, .2, 0, 0]), vocab_size=VOCAB, is_encoder_decoder=True,
                              decoder_start_token_id=0)
    out = generate_ids(backend, encode([(4, 5, 4, 5, 4)], left=False),
                       DecodingOptions(num_beams=num_beams, max_new_tokens=5, min_new_tokens=2))
    assert out[0][0].token_ids == (2, 3, EOS)


def test_sampled_draws_of_one_prompt_see_that_prompt():
    """Draws of an input are contiguous rows: with top_k=1 each draw is greedy decoding of its own prompt,
    repetition penalty (which reads the prompt) included."""
    backend = ScriptedBackend(random_script(eos_weight=0.05), vocab_size=VOCAB)
    greedy = DecodingOptions(num_beams=1, max_new_tokens=5, repetition_penalty=3.0)
    sampled = greedy.replace(do_sample=True, top_k=1, seed=0, num_return_sequences=2)
    alone = [generate_ids(backend, encode([p]), greedy)[0][0].token_ids for p in PROMPTS]
    batched = generate_ids(backend, encode(PROMPTS), sampled)
    assert [[h.token_ids for h in per_input] for per_input in batched] == [[ids, ids] for ids in alone]


def test_a_finished_greedy_row_is_fed_the_pad_token():
    """As in transformers, a row that has ended keeps receiving the pad token while others run on."""
    seen = []

    def script(prompt, generated):
        seen.append((prompt, generated))
        if prompt == (2,):
            return [0, .9, .05, .05, 0, 0]                 # ends at once
        return [0, 0, .5, .5 - 1e-3, 1e-3, 0]              # never ends

    backend = ScriptedBackend(script, vocab_size=VOCAB)
    out = generate_ids(backend, encode([(2,), (3, 3)]), DecodingOptions(num_beams=1, max_new_tokens=3))
    assert out[0][0].token_ids == (EOS,) and len(out[1][0].token_ids) == 3
    assert ((2,), (EOS, PAD)) in seen and not any(prompt == (2,) and g[1:2] not in ((), (PAD,)) for prompt, g in seen)


def test_reorder_time_is_backend_time_not_decoder_overhead(monkeypatch):
    """Reordering the backend's cache (the KV gather after each beam step) is a backend call: its time is in
    backend_seconds, so `deploylm bench`'s decoder overhead (total - backend) does not include it."""
    from deploylm.decoding import search

    now = [0.0]

    def clock():   # a fake perf_counter: 1 s per read, 1000 s inside each reorder
        now[0] += 1.0
        return now[0]

    class SlowReorder(ScriptedBackend):
        def reorder(self, state, beam_idx):
            now[0] += 1000.0
            self.reorders = getattr(self, "reorders", 0) + 1
            return super().reorder(state, beam_idx)

    monkeypatch.setattr(search.time, "perf_counter", clock)
    backend = SlowReorder(random_script(eos_weight=0.0), vocab_size=VOCAB)
    stats = SearchStats()
    generate_ids(backend, encode(PROMPTS), DecodingOptions(num_beams=2, max_new_tokens=4), stats)
    assert backend.reorders >= 2
    assert stats.backend_seconds >= 1000.0 * backend.reorders and stats.decoder_seconds < 1000.0


def test_building_the_results_is_loop_time(monkeypatch):
    """Collecting the finished hypotheses after the last step is the decoder's own work: it is in
    total_seconds (and so in bench's decoder overhead), not lost between the loop and the return."""
    from deploylm.decoding import search

    now = [0.0]

    def clock():   # a fake perf_counter: 1 s per read, 1000 s inside result()
        now[0] += 1.0
        return now[0]

    result = BeamSearch.result

    def slow_result(self, *args, **kwargs):
        now[0] += 1000.0
        return result(self, *args, **kwargs)

    monkeypatch.setattr(search.time, "perf_counter", clock)
    monkeypatch.setattr(BeamSearch, "result", slow_result)
    stats = SearchStats()
    generate_ids(ScriptedBackend(random_script(eos_weight=0.0), vocab_size=VOCAB), encode(PROMPTS),
                 DecodingOptions(num_beams=2, max_new_tokens=3), stats)
    assert stats.total_seconds >= 1000.0 and stats.decoder_seconds >= 1000.0


def test_sampling_with_every_token_banned_names_the_prompt_not_the_draw_row():
    # Two draws per prompt (rows 0, 1: prompt 1; rows 2, 3: prompt 2). Prompt 2 uses every token but EOS,
    # which min_new_tokens bans: its first draw (row 2) has nothing left, and the error names prompt 2.
    backend = ScriptedBackend(random_script(), vocab_size=VOCAB)
    options = DecodingOptions(num_beams=1, do_sample=True, seed=0, max_new_tokens=4, min_new_tokens=4,
                              no_repeat_ngram_size=1, num_return_sequences=2)
    with pytest.raises(UsageError, match=r"nothing left to sample at generated token 1 of prompt 2: "):
        generate_ids(backend, encode([(2,), (2, 3, 4, 5)]), options)
