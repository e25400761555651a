"""Each processor equals its transformers counterpart on random inputs, and validates its arguments."""
from __future__ import annotations

import pytest
import torch

from deploylm.backends.base import ModelInfo, SpecialTokens
from deploylm.decoding import processors as P
from deploylm.decoding.options import DecodingOptions
from deploylm.errors import UsageError

R, L, V = 6, 12, 40


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    sequences = torch.randint(0, 8, (R, L), generator=g)          # a small alphabet: many repeats
    scores = torch.randn(R, V, generator=g) * 3
    return sequences, scores


def _hf():
    from transformers.generation import logits_process as hf
    return hf


@pytest.mark.parametrize("ignore", [None, torch.tensor([0, 1, 2, 3, 11, 0])])
@pytest.mark.parametrize("out_of_vocab", [False, True])
def test_repetition_penalty_matches_transformers(inputs, ignore, out_of_vocab):
    sequences, scores = inputs
    if out_of_vocab:   # ids past the logits (embedding wider than lm_head), also in the last position
        sequences = sequences.clone()
        sequences[0, 3], sequences[1, -1] = V + 2, V + 5
    ours = P.RepetitionPenalty(1.3, ignore)(sequences, scores)
    theirs = _hf().RepetitionPenaltyLogitsProcessor(1.3, prompt_ignore_length=ignore)(sequences, scores.clone())
    assert torch.equal(ours, theirs)
    assert ours.is_contiguous()


@pytest.mark.parametrize("size", [1, 2, 3])
def test_no_repeat_ngram_matches_transformers(inputs, size):
    sequences, scores = inputs
    ours = P.NoRepeatNGram(size)(sequences, scores)
    assert torch.equal(ours, _hf().NoRepeatNGramLogitsProcessor(size)(sequences, scores))
    assert torch.isinf(ours).any()



@pytest.mark.parametrize("size", [1, 2, 3])
def test_no_repeat_ngram_with_ids_past_the_logits_bans_the_rest(inputs, size):
    # ids past the logits (embedding wider than lm_head) in the prompt: an n-gram they complete has nothing to
    # ban (transformers' indexing would fail); every other ban is transformers' (with spare columns, dropped).
    sequences, scores = inputs
    sequences = sequences.clone()
    sequences[:, 4], sequences[:, 9] = V + 2, V + 2          # "x, V+2" n-grams repeat after every x
    sequences[:, -1] = sequences[:, 3]                       # the last token is the one before V+2
    if size == 3:
        sequences[:, -2] = sequences[:, 2]
    ours = P.NoRepeatNGram(size)(sequences, scores)
    padded = torch.nn.functional.pad(scores, (0, 3))
    theirs = _hf().NoRepeatNGramLogitsProcessor(size)(sequences, padded)[:, :V]
    assert torch.equal(ours, theirs)
    assert torch.isinf(ours).any() or size == 3              # size 3: V+2 is the only completion

@pytest.mark.parametrize("length", [3, 5, 6])
def test_min_new_tokens_matches_transformers(inputs, length):
    sequences, scores = inputs
    ours = P.MinNewTokens(2, 4, (1, 7))(sequences[:, :length], scores)
    theirs = _hf().MinNewTokensLengthLogitsProcessor(2, 4, [1, 7])(sequences[:, :length], scores)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("make, length, banning", [
    (lambda: P.MinNewTokens(2, 4, (1, 7, 10_000)), 5, True),   # an EOS id past the vocabulary is ignored
    (lambda: P.MinNewTokens(2, 4, (1, 7)), 6, False),
    (lambda: P.MinLength(6, (3,)), 5, True),
])
def test_eos_bans_write_in_place_only_when_allowed(inputs, make, length, banning):
    """ProcessorList(inplace=True) writes the bans into the caller's buffer (no [R, V] copy per step, issue 7);
    without it the input is left untouched. Values are the same either way."""
    sequences, scores = inputs
    processors = P.ProcessorList([make()])
    before = scores.clone()
    pure = processors(sequences[:, :length], scores)
    assert torch.equal(scores, before)                                     # not modified
    buffer = scores.clone()
    out = processors(sequences[:, :length], buffer, inplace=True)
    assert out.data_ptr() == buffer.data_ptr() and torch.equal(out, pure)
    assert bool(torch.isinf(pure).any()) == banning


@pytest.mark.parametrize("ours, theirs", [
    (lambda: P.Temperature(0.7), lambda hf: hf.TemperatureLogitsWarper(0.7)),
    (lambda: P.TopK(5), lambda hf: hf.TopKLogitsWarper(5)),
    (lambda: P.TopK(1, min_keep=3), lambda hf: hf.TopKLogitsWarper(1, min_tokens_to_keep=3)),
    (lambda: P.TopP(0.8), lambda hf: hf.TopPLogitsWarper(0.8)),
    (lambda: P.TopP(0.01, min_keep=2), lambda hf: hf.TopPLogitsWarper(0.01, min_tokens_to_keep=2)),
])
def test_warpers_match_transformers(inputs, ours, theirs):
    sequences, scores = inputs
    assert torch.equal(ours()(sequences, scores), theirs(_hf())(sequences, scores))


@pytest.mark.parametrize("make, name", [
    (lambda: P.RepetitionPenalty(0.0), "repetition_penalty"),
    (lambda: P.NoRepeatNGram(0), "no_repeat_ngram_size"),
    (lambda: P.MinNewTokens(0, -1, (1,)), "min_new_tokens"),
    (lambda: P.Temperature(0.0), "temperature"),
    (lambda: P.TopK(0), "top_k"),
    (lambda: P.TopP(1.5), "top_p"),
])
def test_constructors_validate(make, name):
    with pytest.raises(UsageError, match=name):
        make()


def test_build_processors_follows_transformers_order():
    info = ModelInfo(is_encoder_decoder=False, vocab_size=V, special=SpecialTokens((1, 2), pad_token_id=0))
    options = DecodingOptions(repetition_penalty=1.2, no_repeat_ngram_size=2, min_new_tokens=1, do_sample=True,
                              temperature=0.5, top_k=3, top_p=0.9)
    built = P.build_processors(options, info, prompt_len=4)
    assert [type(p) for p in built] == [P.RepetitionPenalty, P.NoRepeatNGram, P.MinNewTokens, P.Temperature,
                                        P.TopK, P.TopP]
    assert built[4].top_k == 3 and built[5].min_keep == 3           # beams keep len(eos) + 1 tokens
    assert P.build_processors(DecodingOptions(top_k=5, temperature=0.5), info, 4) == []   # warpers: sampling only


@pytest.mark.parametrize("eos, beams, keep", [((), 3, 2), ((), 1, 1), ((2,), 3, 2), ((1, 2), 3, 3)])
def test_sampling_warpers_keep_what_transformers_keeps(eos, beams, keep):
    # transformers' _get_logits_processor: beams keep len(eos) + 1 tokens, and 2 when the model has no EOS
    # (with 1, beam sampling at top_k=1 on a model without EOS returned empty placeholder hypotheses)
    info = ModelInfo(is_encoder_decoder=False, vocab_size=V, special=SpecialTokens(eos, pad_token_id=0))
    options = DecodingOptions(do_sample=True, num_beams=beams, top_k=1, top_p=0.5)
    top_k, top_p = P.build_processors(options, info, prompt_len=4)
    assert (top_k.top_k, top_p.min_keep) == (keep, keep)


@pytest.mark.parametrize("vocab, top_p, kept", [
    (4, 0.5, 2),      # two tokens reach exactly 0.5: the third is not needed
    (4, 0.75, 3),
    (4, 0.6, 3),      # the token that crosses top_p is kept
    (8, 0.5, 4),
    (8, 0.125, 1),
    (4, 1.0, 4),
])
def test_top_p_keeps_the_smallest_set_that_reaches_top_p(vocab, top_p, kept):
    """Equal scores give exact probabilities (1/4, 1/8): a set whose mass equals top_p exactly is enough, as
    in transformers (it removes the tokens whose ascending cumulative mass is <= 1 - top_p)."""
    scores = torch.zeros(2, vocab)
    out = P.TopP(top_p)(torch.zeros(2, 1, dtype=torch.long), scores)
    assert (torch.isfinite(out).sum(dim=-1) == kept).all()
    assert torch.equal(out, _hf().TopPLogitsWarper(top_p)(None, scores.clone()))


def test_top_k_keeps_every_token_tied_with_the_kth():
    """transformers removes only scores below the k-th highest: tokens tied with it all stay."""
    scores = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0], [2.0, 2.0, 5.0, -1.0, 2.0]])
    out = P.TopK(2)(torch.zeros(2, 1, dtype=torch.long), scores)
    inf = -float("inf")
    assert torch.equal(out, torch.tensor([[inf, 3.0, 3.0, 3.0, inf], [2.0, 2.0, 5.0, inf, 2.0]]))
    assert torch.equal(out, _hf().TopKLogitsWarper(2)(None, scores.clone()))


def test_a_calls_off_value_overrides_the_models_setting():
    # sequence_bias=() and encoder_no_repeat_ngram_size=0 given by a call turn the model's settings off for
    # it (as a generate() keyword replaces the generation_config's); None (the default) keeps the model's.
    info = ModelInfo(is_encoder_decoder=False, vocab_size=V, name="m",
                     special=SpecialTokens(eos_token_ids=(1,), pad_token_id=0),
                     generation={"sequence_bias": [[[3], -2.0]], "encoder_no_repeat_ngram_size": 2})
    prompt = torch.tensor([[2, 3, 4]])

    def kinds(**options):
        built = P.build_processors(DecodingOptions(num_beams=1, **options), info, 3, encoder_input_ids=prompt)
        return [type(p).__name__ for p in built]

    assert kinds() == ["SequenceBias", "EncoderNoRepeatNGram"]
    assert kinds(sequence_bias=(), encoder_no_repeat_ngram_size=0) == []
