"""TransformerConfig: presets, overrides, JSON form and validation."""
from __future__ import annotations

import dataclasses

import pytest

from deploylm.errors import UsageError
from deploylm.models.config import PRESETS, TransformerConfig, make_config


def test_presets_match_the_issue():
    shape = lambda c: (c.d_model, c.n_heads, c.n_encoder_layers, c.n_decoder_layers, c.d_ff)  # noqa: E731
    assert shape(PRESETS["tiny"]) == (128, 4, 2, 2, 256)
    assert shape(PRESETS["small"]) == (256, 4, 3, 3, 1024)
    assert shape(PRESETS["base"]) == (512, 8, 6, 6, 2048)


def test_make_config_sets_vocab_and_overrides():
    config = make_config("small", 321, dropout=0.0, arch="decoder")
    assert (config.vocab_size, config.dropout, config.arch, config.d_model) == (321, 0.0, "decoder", 256)
    assert config.model_type == "deploylm-lm"
    assert make_config("tiny", 50).model_type == "deploylm-seq2seq"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.d_model = 3


def test_make_config_rejects_unknown_size_and_fields():
    with pytest.raises(UsageError, match="'huge'"):
        make_config("huge", 10)
    with pytest.raises(UsageError, match="n_layer"):
        make_config("tiny", 10, n_layer=3)


def test_dict_round_trip_and_model_type():
    config = make_config("tiny", 77, tie_embeddings=False)
    assert TransformerConfig.from_dict(config.to_dict()) == config
    assert TransformerConfig.from_dict({"model_type": "deploylm-seq2seq", **config.to_dict()}) == config
    with pytest.raises(UsageError, match="does not match"):
        TransformerConfig.from_dict({"model_type": "deploylm-lm", **config.to_dict()})


def test_from_dict_names_unknown_keys():
    with pytest.raises(UsageError, match="unknown keys hidden_size, n_layer"):
        TransformerConfig.from_dict({**PRESETS["tiny"].to_dict(), "n_layer": 2, "hidden_size": 5})


@pytest.mark.parametrize("field, value, message", [
    ("n_heads", 3, "multiple of n_heads"),
    ("arch", "bert", "arch"),
    ("dropout", 1.5, "dropout"),
    ("d_model", 0, "d_model"),
    ("eos_token_id", 1000, "below vocab_size"),
    ("tie_embeddings", "yes", "tie_embeddings"),
    ("n_decoder_layers", 2.5, "n_decoder_layers"),
    ("dropout", 1, "dropout"),                        # [0, 1): a dropout of 1 zeroes every activation
    ("dropout", -0.1, "dropout"),
    ("n_heads", True, "n_heads"),                     # a JSON true is not a count
    ("n_encoder_layers", 0, "n_encoder_layers"),      # an encoder-decoder needs an encoder
    ("pad_token_id", -1, "pad_token_id"),
])
def test_invalid_values_are_usage_errors(field, value, message):
    with pytest.raises(UsageError, match=message):
        make_config("tiny", 1000, **{field: value})


def test_a_decoder_only_config_needs_no_encoder_layers():
    config = make_config("tiny", 1000, arch="decoder", n_encoder_layers=0, dropout=0.0)
    assert config.n_encoder_layers == 0 and TransformerConfig.from_dict(config.to_dict()) == config
    assert make_config("tiny", 1000, eos_token_id=999).eos_token_id == 999       # the last id is an id
