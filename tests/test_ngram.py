"""The n-gram baseline: proper distributions, lower perplexity on its training text than on the same
tokens shuffled, and perplexity V for a model that knows nothing."""
import math
import random

import numpy as np
import pytest

from deploylm.errors import UsageError
from deploylm.training.ngram import NGramLM
from deploylm.training.tokenizer import encode_targets, train_tokenizer

TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "the lazy dog sleeps in the sun all day long",
    "a quick brown cat jumps over the sleeping dog",
    "the sun rises and the fox runs over the hill",
] * 5


@pytest.fixture(scope="module")
def encoded():
    tok = train_tokenizer(TEXT, vocab_size=300)
    return tok.get_vocab_size(), encode_targets(tok, TEXT)


@pytest.mark.parametrize("smoothing", ["kneser-ney", "add-k"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_distributions_sum_to_one_and_match_prob(encoded, n, smoothing):
    vocab, seqs = encoded
    lm = NGramLM(n, vocab, smoothing=smoothing, k=0.1).fit(seqs)
    contexts = [[], seqs[0][:1], seqs[0][:5], seqs[1][3:7], [vocab - 1, vocab - 2]]   # seen, partly seen, unseen
    for ctx in contexts:
        probs = lm.distribution(ctx)
        assert probs.shape == (vocab,) and (probs > 0).all()
        assert probs.sum() == pytest.approx(1.0, abs=1e-12)
        for token in (seqs[0][0], seqs[2][4], vocab - 1):
            assert lm.prob(token, ctx) == pytest.approx(probs[token], rel=1e-12)


def test_kneser_ney_uses_continuation_counts():
    # "b" follows many tokens, "z" only ever follows "a": as a lower-order estimate "b" must win
    # although "z" is more frequent.
    a, b, z, c, d, e = range(6)
    seqs = [[a, z]] * 10 + [[c, b], [d, b], [e, b]]
    lm = NGramLM(2, 8).fit(seqs)
    assert lm.prob(b, [7]) > lm.prob(z, [7])          # unseen context 7: continuation unigrams decide
    assert lm.prob(z, [a]) > 0.8                       # seen context: the bigram decides


def test_perplexity_lower_on_training_text_than_shuffled(encoded):
    vocab, seqs = encoded
    lm = NGramLM(3, vocab).fit(seqs)
    rng = random.Random(0)
    shuffled = [rng.sample(seq, len(seq)) for seq in seqs]
    trained, mixed = lm.perplexity(seqs), lm.perplexity(shuffled)
    assert trained < 0.5 * mixed
    assert trained < NGramLM(1, vocab).fit(seqs).perplexity(seqs)      # context helps on its own text


def test_uniform_model_perplexity_is_vocab_size(encoded):
    vocab, seqs = encoded
    for smoothing in ("kneser-ney", "add-k"):
        lm = NGramLM(3, vocab, smoothing=smoothing).fit([])
        assert lm.perplexity(seqs) == pytest.approx(vocab, rel=1e-9)
        assert np.allclose(lm.distribution(seqs[0][:2]), 1 / vocab)


def test_log_likelihood_counts_every_token(encoded):
    vocab, seqs = encoded
    lm = NGramLM(2, vocab).fit(seqs)
    total, count = lm.log_likelihood(seqs[:2])
    assert count == len(seqs[0]) + len(seqs[1])
    expected = sum(math.log(lm.prob(t, seq[max(0, i - 1):i])) for seq in seqs[:2] for i, t in enumerate(seq))
    assert total == pytest.approx(expected)
    later, scored = lm.log_likelihood(seqs[:2], score_from=1)                  # first tokens only as context
    assert scored == count - 2
    assert later == pytest.approx(total - math.log(lm.prob(seqs[0][0])) - math.log(lm.prob(seqs[1][0])))


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=0, vocab_size=10), "n=0"),
    (dict(n=2, vocab_size=0), "vocab_size=0"),
    (dict(n=2, vocab_size=10, smoothing="witten-bell"), "smoothing"),
    (dict(n=2, vocab_size=10, discount=1.5), "discount"),
    (dict(n=2, vocab_size=10, discount=0), "discount"),          # no mass left for unseen tokens: log(0)
    (dict(n=2, vocab_size=10, smoothing="add-k", k=0), "k=0"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(UsageError, match=message):
        NGramLM(**kwargs)


def test_bad_ids_and_empty_input():
    lm = NGramLM(2, 5)
    with pytest.raises(UsageError, match="token id 7 is outside"):
        lm.fit([[1, 7]])
    with pytest.raises(UsageError, match="no tokens"):
        NGramLM(2, 5).fit([[1, 2]]).perplexity([[]])


def test_kneser_ney_probabilities_by_hand():
    """Bigram KN, V=4, d=0.75 (the default) on [0 1], [0 1], [2 1], written out from the module docstring.

    Continuation unigrams (distinct left neighbours, the start symbol S included): 0 <- {S}, 1 <- {0, 2},
    2 <- {S}: 4 in all, 3 types, so the interpolation weight is .75 * 3/4 and
      P_1(w) = max(N(. w) - .75, 0)/4 + .75*3/4 * 1/4:  P_1(0) = P_1(2) = 13/64, P_1(1) = 29/64, P_1(3) = 9/64.
    Bigram context 0 (seen twice, one type; weight .75 * 1/2):
      P(1|0) = (2 - .75)/2 + 3/8 * 29/64 = 407/512, P(0|0) = P(2|0) = 3/8 * 13/64 = 39/512, P(3|0) = 27/512.
    Context S (a sequence's first token; 0 twice, 2 once; weight .75 * 2/3): P(1|S) = 1/2 * 29/64.
    """
    lm = NGramLM(2, 4).fit([[0, 1], [0, 1], [2, 1]])
    assert lm.prob(1, [3]) == pytest.approx(29 / 64) and lm.prob(3, [3]) == pytest.approx(9 / 64)   # 3: unseen
    assert lm.prob(1, [0]) == pytest.approx(407 / 512) and lm.prob(3, [0]) == pytest.approx(27 / 512)
    assert lm.prob(1) == pytest.approx(29 / 128) and lm.prob(0) == pytest.approx((2 - 0.75) / 3 + 0.5 * 13 / 64)
    # only the newest n-1 tokens of a longer context matter
    assert lm.prob(1, [2, 3, 0]) == pytest.approx(407 / 512)
    np.testing.assert_allclose(lm.distribution([2, 3, 0]), np.array([39, 407, 39, 27]) / 512)


def test_trigram_backs_off_to_the_newest_token():
    # the trigram context (4, 1) was never seen: the bigram level of its newest token 1 decides. Continuation
    # counts: 2 <- (0 1) once, so P_2(2|1) = (1 - .75) + .75 * P_1(2), with unigrams 0, 1, 2 once each:
    # P_1(2) = .25/3 + .75 * 1/6 = 5/24, P_2(2|1) = 13/32; context (1, 4) ends in the unseen 4: P_1(2)
    lm = NGramLM(3, 6).fit([[0, 1, 2]] * 3)
    assert lm.prob(2, [4, 1]) == pytest.approx(13 / 32) and lm.prob(2, [1, 4]) == pytest.approx(5 / 24)


def test_an_id_equal_to_the_vocabulary_size_is_refused():
    with pytest.raises(UsageError, match="token id 5 is outside the n-gram model's vocabulary 0..4"):
        NGramLM(2, 5).fit([[1, 5]])
