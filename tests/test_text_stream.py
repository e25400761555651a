"""Streamed text through a byte-level tokenizer: a character whose bytes are several tokens (Chinese, emoji,
accented letters) is held back until it is whole, so the pieces join to the generated text and none carries
a U+FFFD that the text does not have."""
from __future__ import annotations

import pytest

import deploylm
from tests.helpers.scripted_backend import ScriptedBackend, table_script
from tests.helpers.tiny_hf import train_tokenizer

TEXTS = ["我们今天去公园散步", "emoji 😀👍🏽 family 👨‍👩‍👧", "café naïve Ångström"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer("t5")      # byte-level BPE trained on English: every other character is byte tokens


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_multibyte_characters_stream_whole(tokenizer, text, num_beams):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    split = [tokenizer.decode(ids[:i]) for i in range(1, len(ids))]
    assert any(part.endswith("\ufffd") for part in split)      # some prefix ends inside a character
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    table = {tuple(ids[:i]): [0.9 if t == ids[i] else 0.1 / (vocab - 1) for t in range(vocab)]
             for i in range(len(ids))}
    end = [0.9 if t == eos else 0.1 / (vocab - 1) for t in range(vocab)]
    gen = deploylm.Generator(ScriptedBackend(table_script(table, end), vocab, eos_token_ids=(eos,)), tokenizer)
    kwargs = dict(num_beams=num_beams, max_new_tokens=len(ids) + 2)
    [result] = gen.generate("hi", **kwargs)
    assert result.sequences[0].text == text
    stream = gen.stream("hi", **kwargs)
    pieces = list(stream)
    assert "".join(pieces) == text and stream.finish_reason == "stop"
    assert not any("\ufffd" in piece for piece in pieces)
    if num_beams == 1:
        assert len(pieces) > 1                 # still streamed character by character, not held to the end
