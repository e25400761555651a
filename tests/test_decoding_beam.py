"""Beam search against hand-written probability tables (fairseq-style): exact hypotheses and scores.

Vocabulary: 0 pad, 1 EOS, 2 "a", 3 "b". Tables give [p(pad), p(EOS), p(a), p(b)] after each
generated history. Scores are sum(log p) / generated_len ** length_penalty, EOS counted.
"""
from __future__ import annotations

import itertools
import math
import random

import pytest

from deploylm.decoding.options import DecodingOptions
from deploylm.decoding.search import generate_ids, iter_search
from tests.helpers.scripted_backend import ScriptedBackend, encode, table_script

PAD, EOS, A, B = 0, 1, 2, 3
ln = math.log


def run(table, default, prompts=((A,),), **options):
    backend = ScriptedBackend(table_script(table, default), vocab_size=4)
    hyps = generate_ids(backend, encode(prompts), DecodingOptions(**options))
    return [[(h.token_ids, h.score) for h in per_input] for per_input in hyps], backend


def expect(pairs):
    return [(ids, pytest.approx(score, rel=1e-5)) for ids, score in pairs]


# Case A: EOS ranks 3rd at step 0 (outside the top 2: must not finish); "a EOS" finishes at step 1.
TABLE_A = {
    (): [0, .2, .5, .3],
    (A,): [0, .6, .1, .3],
    (B,): [0, .05, .8, .15],
    (B, A): [0, .5, .3, .2],
    (A, B): [0, .9, .06, .04],
}
DEFAULT = [0, .9, .06, .04]


@pytest.mark.parametrize("length_penalty, expected", [
    (1.0, [((A, EOS), ln(.3) / 2), ((A, B, EOS), ln(.135) / 3)]),
    (0.0, [((A, EOS), ln(.3)), ((A, B, EOS), ln(.135))]),        # (EOS,) would rank 2nd had it finished
    (2.0, [((A, B, EOS), ln(.135) / 9), ((B, A, EOS), ln(.12) / 9)]),
])
def test_length_penalty_and_eos_outside_top_k(length_penalty, expected):
    out, _ = run(TABLE_A, DEFAULT, num_beams=2, max_new_tokens=3, num_return_sequences=2,
                 length_penalty=length_penalty)
    assert out == [expect(expected)]


def test_num_return_sequences_one_returns_the_best():
    out, _ = run(TABLE_A, DEFAULT, num_beams=2, max_new_tokens=3, length_penalty=2.0)
    assert out == [expect([((A, B, EOS), ln(.135) / 9)])]


def test_min_new_tokens_blocks_eos_without_renormalizing():
    out, _ = run(TABLE_A, DEFAULT, num_beams=2, max_new_tokens=3, num_return_sequences=2, min_new_tokens=2)
    assert out == [expect([((A, B, EOS), ln(.135) / 3), ((B, A, EOS), ln(.12) / 3)])]


def test_hypotheses_at_max_length_finish_without_eos():
    out, _ = run(TABLE_A, DEFAULT, num_beams=2, max_new_tokens=1, num_return_sequences=2)
    assert out == [expect([((A,), ln(.5)), ((B,), ln(.3))])]


# Case E: the three early_stopping modes give three different answers.
TABLE_E = {
    (): [0, .3, .5, .2],
    (A,): [0, .7, .2, .1],
    (B,): [0, .06, .9, .04],
    (B, A): [0, .95, .03, .02],
    (A, A): [0, .2, .7, .1],
    (A, A, A): [0, .006, .99, .004],
    (A, A, A, A): [0, .99, .006, .004],
}


@pytest.mark.parametrize("early_stopping, expected", [
    (True, [((A, EOS), ln(.35) / 2), ((EOS,), ln(.3))]),               # stops at 2 finished
    (False, [((A, EOS), ln(.35) / 2), ((B, A, EOS), ln(.171) / 3)]),   # best running / cur_len can't win
    ("never", [((A, EOS), ln(.35) / 2), ((A, A, A, A, EOS), ln(.07 * .99 * .99) / 5)]),  # / max_len can
])
def test_early_stopping_modes(early_stopping, expected):
    out, backend = run(TABLE_E, DEFAULT, num_beams=2, max_new_tokens=10, num_return_sequences=2,
                       early_stopping=early_stopping)
    assert out == [expect(expected)]
    decodes = [rows for name, rows in backend.calls if name == "decode"]
    assert len(decodes) == {True: 1, False: 2, "never": 4}[early_stopping]


def test_repetition_penalty_counts_the_prompt_on_log_probs():
    # prompt "a": p(a) -> p(a)**2 at step 0; later every generated token is penalized too
    out, _ = run(TABLE_A, DEFAULT, prompts=((A,),), num_beams=2, max_new_tokens=2, num_return_sequences=2,
                 repetition_penalty=2.0)
    assert out == [expect([((B, A), ln(.3 * .8 ** 2) / 2), ((A, EOS), ln(.5 ** 2 * .6) / 2)])]


def test_no_repeat_ngram_bans_repeats_of_the_whole_sequence():
    # prompt "a b a": the bigram (a, b) exists, so "b" is banned after "a"
    table = {(): [0, .1, .3, .6], (A,): [0, .1, .3, .6]}
    out, _ = run(table, [0, .1, .3, .6], prompts=((A, B, A),), num_beams=2, max_new_tokens=2,
                 num_return_sequences=2, no_repeat_ngram_size=2)
    # after "a b a a" both (a, b) and (a, a) exist: only EOS remains after the second "a"
    assert out == [expect([((A, EOS), ln(.3 * .1) / 2), ((EOS,), ln(.1))])]


def test_reorder_expands_once_and_keeps_beams_contiguous():
    out, backend = run(TABLE_A, DEFAULT, prompts=((A,), (B, A)), num_beams=2, max_new_tokens=3)
    assert backend.calls[:2] == [("prefill", 2), ("reorder", 4)]
    assert all(rows == 4 for name, rows in backend.calls[2:])
    assert out[0] == out[1]            # the table ignores the prompt


def _random_table(vocab: int, depth: int, seed: int) -> dict:
    rng = random.Random(seed)
    table = {}
    for n in range(depth):
        for hist in itertools.product(range(1, vocab), repeat=n):
            weights = [0.0] + [rng.uniform(0.05, 1.0) for _ in range(vocab - 1)]
            table[hist] = [w / sum(weights) for w in weights]
    return table


def _exhaustive(table: dict, vocab: int, max_new: int, length_penalty: float) -> list:
    """Every finished sequence (EOS-terminated, or max_new long) with its score, best first."""
    out = []

    def walk(hist, logp):
        for tok in range(1, vocab):
            p = table.get(hist, [0] + [1 / (vocab - 1)] * (vocab - 1))[tok]
            seq, lp = hist + (tok,), logp + math.log(p)
            if tok == EOS or len(seq) == max_new:
                out.append((seq, lp / len(seq) ** length_penalty))
            else:
                walk(seq, lp)

    walk((), 0.0)
    return sorted(out, key=lambda x: -x[1])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_full_width_beam_equals_exhaustive_search(seed, length_penalty):
    vocab, max_new = 4, 3
    table = _random_table(vocab, max_new, seed)
    truth = _exhaustive(table, vocab, max_new, length_penalty)
    beams = len(truth)          # 1 + 2 + 4 + 2*2*3 = 19 sequences: the beam holds them all
    backend = ScriptedBackend(table_script(table, [0, 1 / 3, 1 / 3, 1 / 3]), vocab_size=vocab)
    options = DecodingOptions(num_beams=beams, max_new_tokens=max_new, length_penalty=length_penalty,
                              early_stopping="never", num_return_sequences=5)
    hyps = generate_ids(backend, encode([(A,)]), options)[0]
    assert [(h.token_ids, h.score) for h in hyps] == expect(truth[:5])


def test_an_input_that_is_done_keeps_its_hypotheses_while_the_batch_runs_on():
    # Input (a,) follows TABLE_E and is done after 3 steps (early_stopping=False); input (b,) never emits
    # EOS and keeps the batch running. Its leftover beam "a a a" would later finish as "a a a a EOS"
    # with a better score than "b a EOS": a done input must not accept it (as in transformers).
    def script(prompt, generated):
        if prompt == (A,):
            return TABLE_E.get(tuple(generated), DEFAULT)
        return [0, 0, .6, .4]

    backend = ScriptedBackend(script, vocab_size=4)
    options = DecodingOptions(num_beams=2, max_new_tokens=10, num_return_sequences=2)
    out = generate_ids(backend, encode([(A,), (B,)]), options)
    assert [(h.token_ids, h.score) for h in out[0]] == expect([((A, EOS), ln(.35) / 2),
                                                              ((B, A, EOS), ln(.171) / 3)])
    assert len(out[1][0].token_ids) == 10
    events = iter_search(backend, encode([(A,), (B,)]), options)
    done = [event.done.tolist() for event in events]
    assert done[:4] == [[False, False], [False, False], [True, False], [True, False]] and done[-1] == [True, True]


def test_chunked_topk_equals_the_full_topk_whenever_it_answers():
    """The fast candidate selection returns exactly torch.topk's values and indices, or None (then the
    caller runs the full top-k): random, tied and -inf-heavy log-probs, several shapes."""
    import torch

    from deploylm.decoding.beam import _chunk_maxima, _chunked_topk

    g = torch.Generator().manual_seed(1)
    answered = 0
    for trial in range(600):
        B, K = [(8, 4), (2, 3), (1, 2), (3, 5)][trial % 4]
        V, k = [49152, 96, 1000, 64, 40][trial % 5], 2 * [(8, 4), (2, 3), (1, 2), (3, 5)][trial % 4][1]
        lp = torch.log_softmax(torch.randn(B * K, V, generator=g) * [0.01, 3, 30][trial % 3], -1)
        if trial % 7 == 0:
            lp = torch.round(lp * 4) / 4  # many ties
        if trial % 11 == 0:
            lp[:, torch.randint(0, V, (V // 2,), generator=g)] = -float("inf")
        bs = torch.randn(B, K, generator=g)
        if trial % 2:
            bs[:, 1:] = -1e9  # the first step: beam 0 alone
        want = torch.topk((lp.view(B, K, V) + bs[:, :, None]).view(B, K * V), k)
        got = _chunked_topk(lp, _chunk_maxima(lp, K), bs, k)
        if got is not None:
            answered += 1
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), trial
    assert answered > 100  # the fast path is really taken


def test_gather_equals_take_along_dim_for_every_shape_the_search_gathers():
    """`_gather` (a row gather without take_along_dim's index wrap) picks exactly take_along_dim's entries:
    sequences [B, N, L] and per-beam [B, N] tensors of every dtype the search keeps, fewer or more picks than N,
    repeated picks, and views that are not contiguous."""
    import torch

    from deploylm.decoding.beam import _gather

    g = torch.Generator().manual_seed(3)
    for B, N, M, L in [(8, 4, 8, 117), (8, 12, 4, 30), (1, 2, 2, 1), (3, 5, 10, 7), (2, 1, 3, 4)]:
        idx = torch.randint(0, N, (B, M), generator=g)
        for tensor in (torch.randint(0, 50_000, (B, N, L), generator=g), torch.randn(B, N, generator=g),
                       torch.rand(B, N, generator=g) > 0.5, torch.randint(0, 9, (B, N), generator=g),
                       torch.randint(0, 50_000, (B, L, N), generator=g).transpose(1, 2)):
            want = torch.take_along_dim(tensor, idx.view(B, M, *[1] * (tensor.dim() - 2)), dim=1)
            got = _gather(tensor, idx)
            assert got.dtype == tensor.dtype and torch.equal(got, want), (B, N, M, tuple(tensor.shape))


# Case N: with a negative length_penalty (score = sum(log p) * len), "never" bounds the running beams at the
# current length, as transformers does for length_penalty <= 0: "a a" (ln .42 * 2 = -1.74) can still beat
# the worst finished "a EOS" (ln .18 * 2 = -3.43), and "a a EOS" (ln .378 * 3 = -2.92) does. Bounding at
# max_new_tokens (ln .42 * 10) would stop after step 2 and return "a EOS".
TABLE_N = {
    (): [0, .3, .6, .1],
    (A,): [0, .3, .7, 0],
    (B,): [0, .4, .6, 0],
    (A, A): [0, .9, .1, 0],
}


def test_never_with_a_negative_length_penalty_bounds_the_running_beams_at_the_current_length():
    out, _ = run(TABLE_N, DEFAULT, num_beams=2, max_new_tokens=10, num_return_sequences=2,
                 early_stopping="never", length_penalty=-1.0)
    assert out == [expect([((EOS,), ln(.3) * 1), ((A, A, EOS), ln(.6 * .7 * .9) * 3)])]


def test_a_done_input_stays_done_when_its_running_score_per_token_recovers():
    # Input (a,): after step 2 "EOS" (ln .3 / 1) and "a EOS" (ln .48 / 2) are finished and the best running
    # beam "a a" is worse than both (ln .072 / 2 = -1.32 < -1.20): the input is done. Its leftover beam then
    # grows at p ~ 1, so its score per token recovers ("a a a": -0.88, "a a a EOS": -0.66) and would beat
    # "EOS"; transformers' heuristic flag is sticky, so the done input keeps its hypotheses. Input (b,)
    # never ends and keeps the batch running.
    table = {
        (): [0, .3, .6, .1],
        (A,): [0, .8, .12, .08],
        (B,): [0, .1, .5, .4],
        (A, A): [0, .001, .998, .001],
        (A, A, A): [0, .998, .001, .001],
    }

    def script(prompt, generated):
        return table.get(tuple(generated), DEFAULT) if prompt == (A,) else [0, 0, .6, .4]

    backend = ScriptedBackend(script, vocab_size=4)
    options = DecodingOptions(num_beams=2, max_new_tokens=6, num_return_sequences=2)
    out = generate_ids(backend, encode([(A,), (B,)]), options)
    assert [(h.token_ids, h.score) for h in out[0]] == expect([((A, EOS), ln(.48) / 2), ((EOS,), ln(.3))])
    done = [event.done.tolist()[0] for event in iter_search(backend, encode([(A,), (B,)]), options)]
    assert done == [False, True, True, True, True, True]


def test_two_eos_ids_keep_three_candidates_per_beam():
    # EOS2 = 4 is a second end token: transformers keeps max(2, 1 + n_eos) * num_beams = 6 candidates, so
    # that num_beams of them do not end. At step 1 the top four are "b EOS", "a a", "a EOS2", "a EOS": only
    # "a a" of them runs on; the 5th, "a b", is the second running beam and ends as "a b EOS", the
    # second-best hypothesis. With 4 candidates the second beam would be a dead one (score -1e9).
    EOS2 = 4
    table = {
        (): [0, .1, .5, .3, .1],
        (A,): [0, .2, .4, .18, .22],
        (B,): [0, .8, .1, .05, .05],
        (A, A): [.2, .17, .21, .22, .2],
        (A, B): [0, .95, .03, .01, .01],
    }
    backend = ScriptedBackend(table_script(table, [0, .9, .04, .03, .03]), vocab_size=5, eos_token_ids=(EOS, EOS2))
    hyps = generate_ids(backend, encode([(A,)]), DecodingOptions(num_beams=2, max_new_tokens=3,
                                                                 num_return_sequences=2))
    assert [(h.token_ids, h.score) for h in hyps[0]] == expect([((B, EOS), ln(.24) / 2),
                                                               ((A, B, EOS), ln(.5 * .18 * .95) / 3)])


def test_early_stopping_true_marks_an_input_done_and_streams_only_its_best_hypothesis():
    # TABLE_E with early_stopping=True: input (a,) has num_beams finished hypotheses after step 2; it is done
    # then, even though input (b,) keeps the batch running, and its only candidate is its best hypothesis.
    def script(prompt, generated):
        return TABLE_E.get(tuple(generated), DEFAULT) if prompt == (A,) else [0, 0, .6, .4]

    backend = ScriptedBackend(script, vocab_size=4)
    options = DecodingOptions(num_beams=2, max_new_tokens=5, early_stopping=True)
    seen = [(event.done.tolist(), event.live_token_ids(0)) for event in iter_search(backend, encode([(A,), (B,)]),
                                                                                    options)]
    assert [done for done, _ in seen] == [[False, False], [True, False], [True, False], [True, False],
                                          [True, True]]
    assert [live for _, live in seen[1:]] == [[(A, EOS)]] * 4      # its length, not the step's, at later steps


def test_a_running_beam_that_only_ties_the_worst_finished_one_ends_the_input():
    # After step 1 both finished slots are full: "EOS" (ln .4) and "a EOS" ((ln .5 + ln .15) / 2); the best
    # running beam "a b" has the same log-probs as "a EOS", so it only ties the worst finished score. As in
    # transformers (`best_running_score > worst_finished_score`), a tie cannot improve: the input is done, and
    # "a b EOS" (p ~ 1 after "a b"), whose score would beat both, is never reached.
    table = {
        (): [0, .4, .5, .1, 0],
        (A,): [0, .3, .25, .3, .15],
        (A, B): [0, .998, .001, .001, 0],
    }
    backend = ScriptedBackend(table_script(table, [0, .25, .25, .25, .25]), vocab_size=5)
    hyps = generate_ids(backend, encode([(A,)]), DecodingOptions(num_beams=2, max_new_tokens=5,
                                                                 num_return_sequences=2))
    assert [(h.token_ids, h.score) for h in hyps[0]] == expect([((EOS,), ln(.4)), ((A, EOS), ln(.5 * .3) / 2)])
    assert [name for name, _ in backend.calls].count("decode") == 1
