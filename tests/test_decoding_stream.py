"""Streaming: pieces are final as soon as every hypothesis that can still win agrees on them."""
from __future__ import annotations

import pytest

from deploylm.decoding.options import DecodingOptions
from deploylm.decoding.search import generate_ids
from deploylm.decoding.stream import common_prefix, stream_ids
from tests.helpers import scripted_backend
from tests.helpers.scripted_backend import ScriptedBackend, encode

PROMPTS = [(2, 3, 4), (5,), (3, 3), (4, 2, 5, 3, 2)]
VOCAB = 6


def random_script(eos_weight: float, peak: float = 0.0):
    return scripted_backend.random_script(VOCAB, eos_weight=eos_weight, peak=peak)


def drain(gen):
    pieces = []
    while True:
        try:
            pieces.append(next(gen))
        except StopIteration as stop:
            return pieces, stop.value


def test_common_prefix():
    assert common_prefix([(1, 2, 3), (1, 2, 4), (1, 2)]) == (1, 2)
    assert common_prefix([(1, 2)]) == (1, 2)
    assert common_prefix([(1,), (2,)]) == ()
    assert common_prefix([]) == ()


def test_greedy_streams_every_token_at_its_step():
    backend = ScriptedBackend(random_script(eos_weight=0.05), vocab_size=VOCAB)
    options = DecodingOptions(num_beams=1, max_new_tokens=6)
    pieces, hyps = drain(stream_ids(backend, encode([PROMPTS[0]]), options))
    best = hyps[0][0].token_ids
    assert [p[0] for p in pieces] == [(t,) for t in best]


@pytest.mark.parametrize("options", [
    dict(num_beams=3, max_new_tokens=10),
    dict(num_beams=4, max_new_tokens=10, length_penalty=2.0, early_stopping="never"),
    dict(num_beams=2, max_new_tokens=10, early_stopping=True, num_return_sequences=2),
    dict(num_beams=1, max_new_tokens=10, do_sample=True, seed=0, num_return_sequences=2),
])
@pytest.mark.parametrize("peak", [0.0, 3.0])
def test_streamed_pieces_add_up_to_the_best_hypothesis(options, peak):
    backend = ScriptedBackend(random_script(eos_weight=0.3, peak=peak), vocab_size=VOCAB)
    opts = DecodingOptions(**options)
    pieces, hyps = drain(stream_ids(backend, encode(PROMPTS), opts))
    assert hyps == generate_ids(backend, encode(PROMPTS), opts)
    for i, per_input in enumerate(hyps):
        streamed = tuple(t for step in pieces for t in step[i])
        assert streamed == per_input[0].token_ids


def test_beam_search_streams_before_the_end_when_beams_agree():
    backend = ScriptedBackend(random_script(eos_weight=0.3, peak=3.0), vocab_size=VOCAB)
    pieces, hyps = drain(stream_ids(backend, encode(PROMPTS), DecodingOptions(num_beams=3, max_new_tokens=10)))
    early = [t for step in pieces[:-1] for per_input in step for t in per_input]
    assert early, "nothing was streamed before the search ended"


def test_a_tokenizer_that_cleans_up_spaces_streams_its_whole_text():
    """T5's and Marian's tokenizers clean up spaces (" n't" -> "n't", " ," -> ","): the text of the tokens so
    far is not a prefix of the next one's, and the stream must neither stall nor lose the rest."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import deploylm

    backend_tok = Tokenizer(models.Unigram())
    backend_tok.pre_tokenizer, backend_tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    backend_tok.train_from_iterator(["I do n't know , he said . it 's here"] * 4, trainers.UnigramTrainer(
        vocab_size=60, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend_tok, eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", clean_up_tokenization_spaces=True)
    for text in ["I do n't know , he said .", "it 's here ."]:
        ids = tok.encode(text, add_special_tokens=False)
        table = {tuple(ids[:i]): [1.0 if t == ids[i] else 0.0 for t in range(len(tok))] for i in range(len(ids))}
        script = scripted_backend.table_script(table, [1.0 if t == 1 else 0.0 for t in range(len(tok))])
        gen = deploylm.Generator(ScriptedBackend(script, len(tok)), tok)
        whole = gen.generate("hi", num_beams=1, max_new_tokens=len(ids) + 1)[0].sequences[0].text
        assert whole == tok.decode(ids) and "'" in whole
        assert "".join(gen.stream("hi", num_beams=1, max_new_tokens=len(ids) + 1)) == whole


def test_a_space_cleaning_tokenizer_streams_text_without_spaces_piece_by_piece():
    """Holding text back only where a space may still be dropped: Chinese (no spaces) through a tokenizer that
    cleans up spaces still streams as it is generated, not as one piece at the end; and in English only a
    space among the last three characters waits ("I do n" -> "I do", then "I don't")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import deploylm
    from deploylm.generator import _settled

    assert _settled("I do n") == "I do" and _settled("I do n'") == "I do" and _settled("I don't") == "I don't"
    assert _settled("he said ,") == "he said" and _settled("said") == "said" and _settled("你好世界") == "你好世界"
    backend_tok = Tokenizer(models.Unigram())
    backend_tok.pre_tokenizer, backend_tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    backend_tok.train_from_iterator(["我们今天去公园散步", "你好世界"] * 4, trainers.UnigramTrainer(
        vocab_size=40, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend_tok, eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", clean_up_tokenization_spaces=True)
    ids = tok.encode("我们今天去公园散步", add_special_tokens=False)
    assert len(ids) >= 3
    table = {tuple(ids[:i]): [1.0 if t == ids[i] else 0.0 for t in range(len(tok))] for i in range(len(ids))}
    script = scripted_backend.table_script(table, [1.0 if t == 1 else 0.0 for t in range(len(tok))])
    gen = deploylm.Generator(ScriptedBackend(script, len(tok)), tok)
    pieces = list(gen.stream("hi", num_beams=1, max_new_tokens=len(ids) + 1))
    assert "".join(pieces) == gen.generate("hi", num_beams=1, max_new_tokens=len(ids) + 1)[0].sequences[0].text
    assert len(pieces) >= len(ids) - 1          # token by token (the first may carry the decoder's leading space)



def test_no_finished_hypothesis_is_no_candidate():
    # vocab 0 pad, 1 EOS, 2 a, 3 b. Nothing finishes before the last step (EOS never ranks in the top 2), so
    # the finished slot of the candidates holds no hypothesis (whatever ids it holds: its initial fill, or a
    # -1e9 candidate that tied into it) and must not count, or streaming would take its ids for a hypothesis.
    from deploylm.decoding.search import iter_search
    from tests.helpers.scripted_backend import table_script

    table = {(): [0, .02, .9, .08], (2,): [0, .05, .5, .45], (3,): [0, .25, .25, .5]}
    backend = ScriptedBackend(table_script(table, [0, .1, .45, .45]), vocab_size=4)
    seen = [(event.candidates[2][0].tolist(), event.live_token_ids(0))
            for event in iter_search(backend, encode([(2,)]), DecodingOptions(num_beams=2, max_new_tokens=4))]
    assert [valid for valid, _ in seen] == [[True, True, False]] * 3 + [[False, False, True]]
    assert [live for _, live in seen[:2]] == [[(2,), (3,)], [(2, 2), (2, 3)]]
