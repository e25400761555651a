"""Text out of a sliding-window call: a window's output that continues the one before it through a shared run
is decoded with it, whatever the tokenizer does at the start of a text or to a character split between windows."""
from __future__ import annotations

import pytest

from deploylm.generator import Generator
from tests.helpers.scripted_backend import WindowedBackend
from tests.helpers.tiny_seed import TEXTS


def sentencepiece_like():
    """A T5/Marian-like tokenizer: Unigram over Metaspace ("▁the"), whose decoder drops the leading space of a
    text; </s> (id 1) appended to a source."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.train_from_iterator(TEXTS * 3, trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def byte_level():
    """deploylm's own byte-level BPE (</s> id 2 appended): a Chinese character or an emoji is several tokens."""
    from transformers import PreTrainedTokenizerFast

    from deploylm.training.tokenizer import train_tokenizer

    return PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(TEXTS, vocab_size=300, min_frequency=1),
                                   eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


@pytest.mark.parametrize("make, text", [
    (sentencepiece_like, " ".join(TEXTS[:2])),
    (byte_level, "我们今天去公园散步，天气很好😀。" * 4)], ids=["sentencepiece", "byte-level"])
@pytest.mark.parametrize("overlap", [1, 4])
def test_windows_that_continue_through_a_shared_run_are_decoded_together(make, text, overlap):
    """A copier's windows overlap: each window's copy continues the joined output through the shared run, so
    the joined text is the source's, streamed or not. Decoded alone, a continuing copy lost its first space to
    the Metaspace decoder ("fox catdog"), and a character cut between two windows became U+FFFD twice."""
    tokenizer = make()
    vocab, eos = len(tokenizer), tokenizer.eos_token_id

    def copy(prompt, generated):
        source = [t for t in prompt if t != eos]
        target = source[len(generated)] if len(generated) < len(source) else eos
        return [1.0 if t == target else 0.0 for t in range(vocab)]

    gen = Generator(WindowedBackend(copy, vocab_size=vocab, eos_token_ids=(eos,), is_encoder_decoder=True,
                                    decoder_start_token_id=0, window=32), tokenizer, defaults={})
    content = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(content) > 3 * 32 and tokenizer.decode(content) == text
    kwargs = dict(truncation="sliding-window", window_overlap=overlap, max_new_tokens=32, num_beams=1)
    [result] = gen.generate(text, **kwargs)
    assert list(result.sequences[0].token_ids) == content + [eos]
    assert result.sequences[0].text == text
    pieces = list(gen.stream(text, **kwargs))
    assert "".join(pieces) == text and not any("\ufffd" in piece for piece in pieces)
