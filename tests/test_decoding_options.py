"""DecodingOptions: defaults, validation messages (each names the option), from_mapping and replace."""
from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

from deploylm.decoding.options import DecodingOptions, option_names, parse_sequence_bias
from deploylm.errors import OptionError, UsageError


def test_defaults_are_deploylm_cli_defaults():
    o = DecodingOptions()
    assert (o.num_beams, o.max_new_tokens, o.min_new_tokens) == (4, 64, None)   # None: the model's min_length
    assert (o.length_penalty, o.repetition_penalty, o.no_repeat_ngram_size, o.early_stopping) == (1.0, 1.0, 0, False)
    assert (o.do_sample, o.top_k, o.top_p, o.temperature, o.seed, o.max_time) == (False, 0, 1.0, 1.0, None, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.num_beams = 2
    with pytest.raises(TypeError):
        DecodingOptions(4)  # keyword-only


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_beams=0), "num_beams"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_beams=1, num_return_sequences=2), "num_return_sequences"),
    (dict(num_return_sequences=0), "num_return_sequences"),
    (dict(length_penalty=float("nan")), "length_penalty"),
    (dict(length_penalty=1e308), "length_penalty"),            # gen_len ** 1e308 overflowed inside beam search
    (dict(length_penalty=-11.0), "length_penalty"),
    (dict(temperature=1e-308), "temperature"),                  # logits / 1e-308 were inf: nan probabilities
    (dict(sequence_bias=[[[5], 1e308]]), "sequence_bias"),        # float32 inf scores ran past EOS
    (dict(length_penalty=float("inf")), "length_penalty"),
    (dict(length_penalty=float("-inf")), "length_penalty"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(encoder_repetition_penalty=float("nan")), "encoder_repetition_penalty"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.3), "repetition_penalty"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=4, min_new_tokens=8), "max_new_tokens"),
    (dict(min_new_tokens=-1), "min_new_tokens"),
    (dict(no_repeat_ngram_size=-2), "no_repeat_ngram_size"),
    (dict(top_k=-1), "top_k"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(early_stopping=1), "early_stopping"),
    (dict(num_beams=2.5), "num_beams"),
    (dict(num_beams=True), "num_beams"),
    (dict(length_penalty="long"), "length_penalty"),
    (dict(do_sample="yes"), "do_sample"),
    (dict(seed=1.5), "seed"),
    (dict(seed=-1), "seed=-1 is invalid: out of range, expected 0 <= seed < 2**63"),
    (dict(seed=2**63), "out of range"),
    (dict(max_time=0), "max_time"),
    (dict(sequence_bias=[[1, 2]]), "sequence_bias"),
    (dict(sequence_bias=[[[1], "x"]]), "sequence_bias"),
    (dict(sequence_bias=[[[1, -2], 1.0]]), "sequence_bias"),
    (dict(encoder_repetition_penalty=0), "encoder_repetition_penalty"),
    (dict(encoder_repetition_penalty="high"), "encoder_repetition_penalty"),
    (dict(encoder_no_repeat_ngram_size=-1), "encoder_no_repeat_ngram_size"),
    (dict(encoder_no_repeat_ngram_size=1.5), "encoder_no_repeat_ngram_size"),
    (dict(exponential_decay_length_penalty=(1,)), "exponential_decay_length_penalty"),
    (dict(exponential_decay_length_penalty=(1.5, 2.0)), "exponential_decay_length_penalty"),
])
def test_invalid_values_name_the_option_and_the_value(kwargs, name):
    with pytest.raises(UsageError) as err:
        DecodingOptions(**kwargs)
    message = str(err.value)
    assert name in message and repr(kwargs.get(name, "")).strip("'") in message
    assert "\n" not in message



@pytest.mark.parametrize("kwargs", [
    dict(length_penalty=10.0), dict(length_penalty=-10.0), dict(temperature=1e-6, do_sample=True),
    dict(top_p=1.0), dict(min_new_tokens=5, max_new_tokens=5), dict(num_beams=3, num_return_sequences=3),
    dict(sequence_bias=[[[1], 1e6], [[2], -1e6]]), dict(seed=2**63 - 1), dict(seed=0),
])
def test_the_bounds_of_every_range_are_accepted(kwargs):
    """The ranges the messages state are inclusive ("between -10 and 10", "temperature >= 1e-06", ...)."""
    options = DecodingOptions(**kwargs)
    assert all(getattr(options, name) == pytest.approx(value) for name, value in kwargs.items()
               if name != "sequence_bias")

@pytest.mark.parametrize("do_sample, advice", [
    (False, "use a temperature >= 1e-06 with do_sample; without it (greedy or beam search) leave temperature out"),
    (True, "use a temperature >= 1e-06 (for greedy decoding leave do_sample off)"),
])
def test_a_temperature_of_0_is_advised_by_whether_the_call_samples(do_sample, advice):
    """temperature=0 in a call that does not sample was told "for greedy decoding leave do_sample off", which
    that call already does (an OpenAI habit: temperature 0 for greedy); it is told to leave temperature out."""
    with pytest.raises(OptionError, match=r"^decoding option temperature=0.0 is invalid: " + re.escape(advice) + "$"):
        DecodingOptions(temperature=0.0, do_sample=do_sample)


def test_sampling_may_return_more_draws_than_beams():
    assert DecodingOptions(num_beams=1, do_sample=True, num_return_sequences=5).num_return_sequences == 5


@pytest.mark.parametrize("value, parsed", [("true", True), ("False", False), ("never", "never"), (True, True)])
def test_early_stopping_accepts_cli_strings(value, parsed):
    assert DecodingOptions(early_stopping=value).early_stopping == parsed


def test_from_mapping_rejects_unknown_keys_and_validates():
    o = DecodingOptions.from_mapping({"num_beams": 2, "length_penalty": 0, "early_stopping": "never"})
    assert (o.num_beams, o.length_penalty, o.early_stopping) == (2, 0.0, "never")
    assert isinstance(o.length_penalty, float)
    with pytest.raises(UsageError, match="'beam_size'"):
        DecodingOptions.from_mapping({"beam_size": 4})
    with pytest.raises(UsageError, match="top_p"):
        DecodingOptions.from_mapping({"top_p": 2})


def test_replace_validates_and_rejects_unknown_names():
    o = DecodingOptions().replace(num_beams=8, num_return_sequences=8)
    assert (o.num_beams, o.num_return_sequences) == (8, 8)
    with pytest.raises(UsageError, match="num_return_sequences"):
        o.replace(num_beams=2)
    with pytest.raises(UsageError, match="'beams'"):
        o.replace(beams=2)
    assert DecodingOptions.from_mapping(o.to_dict()) == o
    assert set(o.to_dict()) == set(option_names())


def test_model_settings_options_default_to_the_models_and_normalize():
    o = DecodingOptions()
    assert (o.sequence_bias, o.encoder_repetition_penalty, o.encoder_no_repeat_ngram_size,
            o.exponential_decay_length_penalty) == (None, None, None, None)   # None: the model's setting
    o = DecodingOptions(sequence_bias={(4, 5): -1, (3,): 2.5}, exponential_decay_length_penalty=[2, 3],
                        encoder_repetition_penalty=2)
    assert o.sequence_bias == (((4, 5), -1.0), ((3,), 2.5))
    assert o.exponential_decay_length_penalty == (2, 3.0) and isinstance(o.encoder_repetition_penalty, float)
    # a repeated token sequence keeps its last bias, as transformers' list -> dict conversion
    assert DecodingOptions(sequence_bias=[[[3], 1.0], [[4], 2.0], [[3], -1.0]]).sequence_bias == (
        ((3,), -1.0), ((4,), 2.0))
    assert DecodingOptions(sequence_bias=[]).sequence_bias == ()
    assert DecodingOptions.from_mapping(o.to_dict()) == o


@pytest.mark.parametrize("name", ["num_beam_groups", "diversity_penalty"])
def test_group_beam_search_is_refused_saying_why(name):
    with pytest.raises(UsageError, match="transformers-community/group-beam-search.*trust_remote_code"):
        DecodingOptions.from_mapping({name: 2})
    with pytest.raises(UsageError, match="group beam search"):
        DecodingOptions().replace(**{name: 2})


def test_a_default_min_new_tokens_above_a_given_max_new_tokens_is_lowered_to_it():
    """A model whose generation_config says min_new_tokens=8 still answers max_new_tokens=2 (EOS banned to the
    end, as transformers' generate runs it); the two given together and contradictory are still refused."""
    model_defaults = DecodingOptions(min_new_tokens=8, max_new_tokens=32)
    call = model_defaults.replace(max_new_tokens=2)
    assert (call.max_new_tokens, call.min_new_tokens) == (2, 2)
    assert model_defaults.replace(max_new_tokens=12).min_new_tokens == 8      # above the default: kept
    with pytest.raises(UsageError, match="max_new_tokens"):
        model_defaults.replace(max_new_tokens=2, min_new_tokens=8)
    with pytest.raises(UsageError, match="max_new_tokens"):
        model_defaults.replace(max_new_tokens=0)                                 # still its own range error


def test_a_given_min_new_tokens_above_the_default_max_new_tokens_names_the_given_option():
    """A call that gives only min_new_tokens, above the default max_new_tokens (the model's or deploylm's), is
    refused naming min_new_tokens (the CLI: --min-new-tokens), not max_new_tokens, which the caller did not give."""
    model_defaults = DecodingOptions(max_new_tokens=3)
    with pytest.raises(OptionError, match=r"min_new_tokens=5 is invalid: above the default max_new_tokens=3") as err:
        model_defaults.replace(min_new_tokens=5)
    assert err.value.option == "min_new_tokens"
    assert model_defaults.replace(min_new_tokens=5, max_new_tokens=5).min_new_tokens == 5
    assert model_defaults.replace(min_new_tokens=3).min_new_tokens == 3
    with pytest.raises(OptionError, match=r"max_new_tokens=4 is invalid: must be >= min_new_tokens=5"):
        model_defaults.replace(min_new_tokens=5, max_new_tokens=4)     # both given: the existing message


def test_a_sequence_bias_over_the_bound_advises_what_a_call_can_pass():
    """bad_words_ids is a setting of the model's generation_config, not an option of a call: the refusal of a
    call's bias names the bias that forbids a sequence (accepted) and where bad_words_ids lives; a model's own
    sequence_bias, set in that same generation_config, keeps the bad_words_ids advice."""
    with pytest.raises(UsageError, match="unknown decoding option"):
        DecodingOptions.from_mapping({"bad_words_ids": [[3]]})
    with pytest.raises(UsageError, match=r"beyond ±1e\+06.*; to forbid a sequence give it a bias of -1e\+06 \(or "
                                         r"list it in the model's generation_config bad_words_ids\)$"):
        DecodingOptions(sequence_bias=[[[3], -1e9]])
    assert DecodingOptions(sequence_bias=[[[3], -1e6]]).sequence_bias == (((3,), -1e6),)
    with pytest.raises(UsageError, match="to forbid a sequence use bad_words_ids$"):
        parse_sequence_bias([[[3], -1e9]], "generation setting")


# Every int and float option, with a valid value of each NumPy type a user computing options gets.
NUMPY_INTS = [(name, value) for name, value in (("num_beams", 2), ("max_new_tokens", 8), ("min_new_tokens", 2),
                                                ("no_repeat_ngram_size", 3), ("num_return_sequences", 2),
                                                ("top_k", 5), ("seed", 7), ("encoder_no_repeat_ngram_size", 2))]
NUMPY_FLOATS = [("length_penalty", 0.5), ("repetition_penalty", 1.25), ("temperature", 0.75), ("top_p", 0.5),
                ("encoder_repetition_penalty", 1.5), ("max_time", 2.5)]


@pytest.mark.parametrize("name, value", NUMPY_INTS)
@pytest.mark.parametrize("kind", [np.int64, np.int32, np.uint8])
def test_numpy_integers_are_taken_as_plain_ints(name, value, kind):
    """gen.generate(p, num_beams=np.int64(2)) said "expected an integer"; the value is stored as a plain int, so
    to_dict() stays JSON (artifacts, bench reports) and nothing downstream sees a NumPy type."""
    options = DecodingOptions(**{name: kind(value)})
    assert type(getattr(options, name)) is int and getattr(options, name) == value
    json.dumps(options.to_dict())
    changed = DecodingOptions().replace(**{name: kind(value)})
    assert type(getattr(changed, name)) is int and changed == options


@pytest.mark.parametrize("name, value", NUMPY_FLOATS)
@pytest.mark.parametrize("kind", [np.float32, np.float64, np.float16])
def test_numpy_floats_are_taken_as_plain_floats(name, value, kind):
    options = DecodingOptions(**{name: kind(value)})
    assert type(getattr(options, name)) is float and getattr(options, name) == value   # each value exact in float16
    json.dumps(options.to_dict())
    assert DecodingOptions().replace(**{name: kind(value)}) == options


@pytest.mark.parametrize("name", [name for name, _ in NUMPY_FLOATS])
def test_a_numpy_integer_where_a_number_is_expected_is_a_plain_float(name):
    assert type(getattr(DecodingOptions(**{name: np.int64(1)}), name)) is float


def test_numpy_values_inside_sequence_bias_and_exponential_decay_are_plain_too():
    options = DecodingOptions(sequence_bias=[[[np.int64(3), np.int32(4)], np.float32(-2.0)]],
                              exponential_decay_length_penalty=(np.int64(8), np.float32(1.5)))
    [(ids, bias)] = options.sequence_bias
    assert ids == (3, 4) and all(type(t) is int for t in ids) and type(bias) is float
    start, factor = options.exponential_decay_length_penalty
    assert (start, factor) == (8, 1.5) and type(start) is int and type(factor) is float
    json.dumps(options.to_dict())


def test_a_numpy_max_new_tokens_lowers_a_model_min_new_tokens_as_an_int_does():
    model_defaults = DecodingOptions(min_new_tokens=8, max_new_tokens=32)
    assert model_defaults.replace(max_new_tokens=np.int64(2)) == model_defaults.replace(max_new_tokens=2)
    with pytest.raises(OptionError, match=r"min_new_tokens=40 is invalid: above the default max_new_tokens=32"):
        model_defaults.replace(min_new_tokens=np.int64(40))


@pytest.mark.parametrize("kwargs, expected", [
    (dict(num_beams=np.float64(2.0)), "expected an integer"),      # a float where an integer is expected
    (dict(top_k=np.float32(5.0)), "expected an integer"),
    (dict(num_beams=np.bool_(True)), "expected an integer"),        # a boolean is no count
    (dict(seed=np.float64(3.0)), "expected an integer or none"),
    (dict(temperature=np.bool_(True)), "expected a number"),
    (dict(temperature=np.float32("nan"), do_sample=True), "expected a finite number"),
    (dict(length_penalty=np.float64("inf")), "expected a finite number"),
    (dict(max_new_tokens=np.int64(0)), "use max_new_tokens >= 1"),  # converted, then range-checked as an int
    (dict(seed=np.uint64(2**63)), "out of range"),
    (dict(sequence_bias=[[[np.float64(3.0)], 1.0]]), "sequence_bias"),
])
def test_numpy_values_of_the_wrong_kind_are_still_refused(kwargs, expected):
    with pytest.raises(OptionError, match=re.escape(expected)):
        DecodingOptions(**kwargs)
