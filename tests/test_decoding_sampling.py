"""Sampling draws from the right distribution, not just reproducibly.

A table backend (logits chosen by hand, per last token) is sampled 20,000 times in one call
(num_return_sequences); the frequency of every generated sequence is compared with its exact probability,
enumerated with transformers' own LogitsProcessor/Warper classes on the same logits and histories. The seed is
fixed, so the test is deterministic; the bound (every sequence within 5 standard deviations of its expected
count, and no impossible sequence drawn) is far from what the sampler reaches (under 3 sigma here) and from what
the draws of nearby options score against these (over 20 sigma: test_the_bound_fails_the_distribution_of_other_options).
"""
from __future__ import annotations

import math

import pytest
import torch

from deploylm.backends.base import EncodedBatch, ModelInfo, SpecialTokens
from deploylm.decoding.options import DecodingOptions
from deploylm.decoding.search import generate_ids
from tests.helpers.hf_reference import hf_processors
from tests.helpers.scripted_backend import ScriptedBackend, encode

PAD, EOS, V = 0, 1, 6
DRAWS = 20_000
PROMPT = (2, 3)
NEG = -math.inf
# logits after each last token: pad never generated (-inf), ties at the top (after 2: tokens 3 and 5; after 3:
# tokens 2 and 4), a tie at the second place (after 4: EOS and token 5), and a flat row (after 5)
TABLE = torch.tensor([
    [NEG, 0.0, 0.0, 0.0, 0.0, 0.0],     # after pad (unused)
    [NEG, 0.0, 0.0, 0.0, 0.0, 0.0],     # after EOS (unused: a row that ends is done)
    [NEG, -0.5, 0.3, 1.0, -1.0, 1.0],   # after 2
    [NEG, -1.0, 1.2, 0.1, 1.2, -0.4],   # after 3
    [NEG, 0.7, 1.5, -0.2, 0.0, 0.7],    # after 4
    [NEG, 0.0, 0.0, 0.0, 0.0, 0.0],     # after 5
])


class TableBackend:
    """Logits TABLE[last token] for every row, vectorized (20,000 rows a step)."""

    name = "table"
    device = torch.device("cpu")

    def __init__(self, generation: dict | None = None):
        self.info = ModelInfo(is_encoder_decoder=False, vocab_size=V, name="table", generation=generation or {},
                              special=SpecialTokens(eos_token_ids=(EOS,), pad_token_id=PAD))

    def prefill(self, batch: EncodedBatch):
        last = batch.input_ids[:, -1]
        return TABLE[last].clone(), last

    def decode(self, tokens, state):
        return TABLE[tokens].clone(), tokens

    def reorder(self, state, rows):
        return state[rows]


def _transformers_processors(options: DecodingOptions, generation: dict):
    """transformers' processors for these options, in generate()'s order (decoder-only, sampling, one beam)."""
    hf = hf_processors()
    out = hf.LogitsProcessorList()
    eos = torch.tensor([EOS])
    if options.repetition_penalty != 1.0:
        out.append(hf.RepetitionPenaltyLogitsProcessor(options.repetition_penalty))
    if options.no_repeat_ngram_size:
        out.append(hf.NoRepeatNGramLogitsProcessor(options.no_repeat_ngram_size))
    if generation.get("bad_words_ids"):
        out.append(hf.NoBadWordsLogitsProcessor(generation["bad_words_ids"], eos))
    if options.min_new_tokens:
        out.append(hf.MinNewTokensLengthLogitsProcessor(len(PROMPT), options.min_new_tokens, eos))
    if options.temperature != 1.0:
        out.append(hf.TemperatureLogitsWarper(options.temperature))
    if options.top_k:
        out.append(hf.TopKLogitsWarper(options.top_k))
    if options.top_p < 1.0:
        out.append(hf.TopPLogitsWarper(options.top_p))
    return out


def _exact(options: DecodingOptions, generation: dict) -> dict[tuple[int, ...], float]:
    """Every generated sequence's probability: transformers' processors on each history, then softmax."""
    processors = _transformers_processors(options, generation)
    out: dict[tuple[int, ...], float] = {}

    def walk(prefix: tuple[int, ...], p: float) -> None:
        if len(prefix) == options.max_new_tokens or (prefix and prefix[-1] == EOS):
            out[prefix] = out.get(prefix, 0.0) + p
            return
        ids = torch.tensor([PROMPT + prefix])
        probs = processors(ids, TABLE[ids[:, -1]].clone()).softmax(-1)[0].double()
        for token, q in enumerate(probs.tolist()):
            if q > 0:
                walk(prefix + (token,), p * q)

    walk((), 1.0)
    return out


def _draw(options: DecodingOptions, generation: dict | None = None) -> dict[tuple[int, ...], int]:
    """How often each generated sequence came out of one call of DRAWS draws from PROMPT."""
    batch = EncodedBatch(torch.tensor([PROMPT]), torch.ones(1, len(PROMPT), dtype=torch.long))
    [hyps] = generate_ids(TableBackend(generation), batch, options)
    assert len(hyps) == DRAWS
    counts: dict[tuple[int, ...], int] = {}
    for h in hyps:
        counts[h.token_ids] = counts.get(h.token_ids, 0) + 1
    return counts


def _sigmas(counts: dict[tuple[int, ...], int], exact: dict[tuple[int, ...], float]) -> tuple[float, int]:
    """(the largest |count - expected| / sd over the possible sequences, how many impossible ones were drawn)."""
    impossible = sum(n for ids, n in counts.items() if ids not in exact)
    worst = 0.0
    for ids, p in exact.items():
        sd = math.sqrt(DRAWS * p * (1 - p)) or 1.0
        worst = max(worst, abs(counts.get(ids, 0) - DRAWS * p) / sd)
    return worst, impossible


CASES = {
    "plain": dict(),
    "temperature-0.5": dict(temperature=0.5),
    "temperature-2": dict(temperature=2.0),
    "temperature-tiny-ties": dict(temperature=1e-6),          # after 3: a fair coin between the tied 2 and 4
    "top_k-1-ties": dict(top_k=1),                            # ties with the k-th are kept
    "top_k-2-ties": dict(top_k=2),
    "top_p-0.6": dict(top_p=0.6),
    "top_p-1": dict(top_p=1.0),
    "repetition_penalty": dict(repetition_penalty=1.8),
    "repetition_penalty-below-1": dict(repetition_penalty=0.6),
    "no_repeat_ngram": dict(no_repeat_ngram_size=1),
    "min_new_tokens": dict(min_new_tokens=2),
    "all-warpers-and-penalties": dict(temperature=0.7, top_k=3, top_p=0.8, repetition_penalty=1.3,
                                      no_repeat_ngram_size=2, min_new_tokens=1),
}


@pytest.mark.parametrize("options", CASES.values(), ids=CASES.keys())
def test_sampled_sequences_follow_transformers_distribution(options):
    opts = DecodingOptions(num_beams=1, do_sample=True, seed=0, max_new_tokens=3, num_return_sequences=DRAWS,
                           **options)
    worst, impossible = _sigmas(_draw(opts), _exact(opts, {}))
    assert impossible == 0
    assert worst < 5, worst


@pytest.mark.parametrize("generation", [
    {"bad_words_ids": [[4], [3, 5]]},
    {"bad_words_ids": [[2], [3], [4], [5]]},        # all but EOS banned: every draw ends at once
], ids=["bad-words", "all-but-eos-banned"])
def test_sampling_with_the_models_bad_words_follows_transformers_distribution(generation):
    opts = DecodingOptions(num_beams=1, do_sample=True, seed=0, max_new_tokens=3, num_return_sequences=DRAWS,
                           top_k=2)
    worst, impossible = _sigmas(_draw(opts, generation), _exact(opts, generation))
    assert impossible == 0
    assert worst < 5, worst


@pytest.mark.parametrize("options, other", [
    (dict(temperature=0.7), dict(temperature=1.0)),
    (dict(temperature=0.7, top_k=3, top_p=0.8), dict(temperature=0.7, top_k=3, top_p=0.9)),
    (dict(temperature=0.7, top_k=3, top_p=0.8), dict(temperature=0.7, top_p=0.8)),
    (dict(repetition_penalty=1.8), dict()),
    (dict(min_new_tokens=2), dict()),
], ids=["temperature", "top_p", "top_k", "repetition_penalty", "min_new_tokens"])
def test_the_bound_fails_the_distribution_of_other_options(options, other):
    """The draws of one set of options, checked against the distribution of a nearby set, fail the bound by
    far: the check tells them apart."""
    opts = DecodingOptions(num_beams=1, do_sample=True, seed=0, max_new_tokens=3, num_return_sequences=DRAWS,
                           **options)
    counts = _draw(opts)
    assert _sigmas(counts, _exact(opts, {}))[0] < 5
    nearby = DecodingOptions(num_beams=1, do_sample=True, max_new_tokens=3, **other)
    worst, impossible = _sigmas(counts, _exact(nearby, {}))
    assert worst > 10 or impossible > 0, worst


def test_a_rows_draws_do_not_depend_on_the_other_rows_of_its_batch():
    """Rows of a batch share the seed's stream by position (docs/decoding.md, --batch-size); what the other row
    is, what it draws and how soon it ends do not move this row's draws."""
    def script(prompt, generated):
        if prompt == (5,):     # ends at once
            return [0, 1, 0, 0, 0, 0]
        if prompt == (4,):     # never ends
            return [0, 0, .25, .25, .25, .25]
        return [0, .1, .3, .2, .2, .2]

    backend = ScriptedBackend(script, vocab_size=V)
    for options in (dict(num_beams=1, num_return_sequences=2, top_k=3), dict(num_beams=2, temperature=1.5)):
        opts = DecodingOptions(do_sample=True, seed=3, max_new_tokens=8, **options)
        beside_short = generate_ids(backend, encode([(2, 3), (5,)]), opts)
        beside_long = generate_ids(backend, encode([(2, 3), (4,)]), opts)
        assert beside_short[0] == beside_long[0]
        assert beside_short[1] != beside_long[1]
