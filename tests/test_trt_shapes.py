"""Optimization-profile shapes and KV buffer sizes derived from a profile's [tensorrt] table (no TensorRT)."""
from __future__ import annotations

import dataclasses

import pytest

from deploylm.errors import UsageError
from deploylm.export.trt_shapes import (TrtShapes, check_fits, check_prefill, engine_phases, kv_buffer_plan,
                                        profile_shapes, shapes_from_profile)
from deploylm.profiles import Profile

H, D = 2, 8
DECODER_INPUTS = {
    "input_ids": (None, None), "attention_mask": (None, None), "position_ids": (None, None),
    "past_key_values.0.key": (None, H, None, D), "past_key_values.0.value": (None, H, None, D),
}
SHAPES = TrtShapes(batch=(1, 4, 16), sequence=(1, 64, 512), past=(0, 64, 512), num_beams=4)


def test_prefill_profile_has_many_tokens_and_no_past():
    s = profile_shapes(DECODER_INPUTS, SHAPES, "prefill", decoder_only=True)
    assert s["input_ids"] == ((1, 1), (4, 64), (16, 512))
    assert s["attention_mask"] == s["input_ids"] == s["position_ids"]
    assert s["past_key_values.0.key"] == ((1, H, 0, D), (4, H, 0, D), (16, H, 0, D))


def test_decode_profile_has_one_token_beam_rows_and_past_up_to_max():
    s = profile_shapes(DECODER_INPUTS, SHAPES, "decode", decoder_only=True)
    assert s["input_ids"] == ((1, 1), (16, 1), (64, 1))              # rows: batch x beams
    assert s["past_key_values.0.value"] == ((1, H, 1, D), (16, H, 64, D), (64, H, 512, D))
    assert s["attention_mask"] == ((1, 2), (16, 65), (64, 513))       # past + the new token


def test_encoder_decoder_profiles():
    enc = profile_shapes({"input_ids": (None, None), "attention_mask": (None, None)}, SHAPES, "encoder",
                         decoder_only=False)
    assert enc["attention_mask"] == ((1, 1), (4, 64), (16, 512))
    dec_inputs = {"input_ids": (None, None), "encoder_hidden_states": (None, None, 32),
                  "encoder_attention_mask": (None, None),
                  "past_key_values.0.decoder.key": (None, H, None, D),
                  "past_key_values.0.encoder.key": (None, H, None, D)}
    dec = profile_shapes(dec_inputs, SHAPES, "decode", decoder_only=False)
    assert dec["past_key_values.0.decoder.key"][0] == (1, H, 0, D)    # first decoder step: no past
    assert dec["past_key_values.0.encoder.key"][2] == (64, H, 512, D)  # cross-attention: source length
    assert dec["encoder_hidden_states"][1] == (16, 64, 32)
    with pytest.raises(UsageError, match="no prefill"):
        profile_shapes(dec_inputs, SHAPES, "prefill", decoder_only=False)
    assert engine_phases("model") == ("prefill", "decode") and engine_phases("encoder_model") == ("encoder",)


def test_shapes_from_profile_reads_tensorrt_table_and_beams():
    profile = Profile.from_dict({"name": "t", "description": "d", "precision": "fp16", "backends": ["trt"],
                                 "parity": {"logits_atol": 0.1, "logprob_atol": 0.1, "min_token_agreement": 0.9},
                                 "tensorrt": {"workspace_gb": 1, "shapes": {"batch": [1, 2, 8], "sequence": [1, 16, 128],
                                                                            "past": [0, 16, 256]}},
                                 "generation": {"num_beams": 3}})
    shapes = shapes_from_profile(profile)
    assert (shapes.batch, shapes.sequence, shapes.past, shapes.num_beams) == ((1, 2, 8), (1, 16, 128), (0, 16, 256), 3)
    assert shapes.decode_rows == (1, 6, 24) and shapes_from_profile(profile, num_beams=1).decode_rows == (1, 2, 8)
    with pytest.raises(UsageError, match="no \\[tensorrt\\] table"):
        shapes_from_profile(dataclasses.replace(profile, tensorrt=None))


@pytest.mark.parametrize("bad", [(4, 2, 8), (0, 1, 2), (1, 2), (1.0, 2, 3)])
def test_bad_ranges_are_refused(bad):
    with pytest.raises(UsageError, match="shapes.batch"):
        TrtShapes(batch=bad, sequence=(1, 2, 3), past=(0, 1, 2))


def test_unknown_input_and_dynamic_heads_are_refused():
    with pytest.raises(UsageError, match="not in the io spec"):
        profile_shapes({"token_type_ids": (None, None)}, SHAPES, "prefill", decoder_only=True)
    with pytest.raises(UsageError, match="must be static"):
        profile_shapes({"past_key_values.0.key": (None, None, None, D)}, SHAPES, "decode", decoder_only=True)


def test_kv_buffer_plan_is_sized_for_batch_beams_and_max_length():
    phases = {p: profile_shapes(DECODER_INPUTS, SHAPES, p, decoder_only=True) for p in ("prefill", "decode")}
    plan = kv_buffer_plan(phases, itemsize=2)
    assert (plan.rows, plan.heads, plan.max_len, plan.head_dim) == (64, H, 513, D)
    assert plan.names == ("past_key_values.0.key", "past_key_values.0.value")
    assert plan.numel == 64 * H * 513 * D
    assert plan.total_bytes == 2 * 2 * plan.numel * 2                  # 2 names x ping-pong x fp16
    assert kv_buffer_plan(phases, itemsize=4, rows=8).rows == 8
    check_fits(64, 513, plan)
    with pytest.raises(UsageError, match="65 rows"):
        check_fits(65, 10, plan)
    with pytest.raises(UsageError, match="514 tokens"):
        check_fits(1, 514, plan)


# ---- boundaries that hand mutants of trt_shapes showed untested ----------------------------------

def test_equal_min_opt_max_is_a_valid_range_and_bad_types_or_lengths_are_not():
    shapes = TrtShapes(batch=(1, 1, 1), sequence=(8, 8, 8), past=(0, 0, 0))       # TensorRT takes min == opt == max
    assert shapes.decode_rows == (1, 1, 1)
    for bad in [(True, 2, 3), (1, 2, 3, 4), (1, 2, 3.0)]:
        with pytest.raises(UsageError, match="shapes.batch"):
            TrtShapes(batch=bad, sequence=(1, 2, 3), past=(0, 1, 2))
    for beams in (0, -1, 2.0):
        with pytest.raises(UsageError, match="num_beams"):
            TrtShapes(batch=(1, 2, 3), sequence=(1, 2, 3), past=(0, 1, 2), num_beams=beams)


def test_cross_attention_cache_follows_the_source_length_not_the_past():
    shapes = TrtShapes(batch=(1, 2, 4), sequence=(1, 16, 128), past=(0, 8, 32), num_beams=2)
    dec_inputs = {"input_ids": (None, None), "past_key_values.0.decoder.key": (None, H, None, D),
                  "past_key_values.0.encoder.key": (None, H, None, D)}
    dec = profile_shapes(dec_inputs, shapes, "decode", decoder_only=False)
    assert dec["past_key_values.0.encoder.key"] == ((1, H, 1, D), (4, H, 16, D), (8, H, 128, D))
    assert dec["past_key_values.0.decoder.key"] == ((1, H, 0, D), (4, H, 8, D), (8, H, 32, D))
    plan = kv_buffer_plan({"decode": dec}, itemsize=2)                 # the self-attention cache only
    assert plan.names == ("past_key_values.0.decoder.key",) and plan.max_len == 33


def test_unknown_phase_and_missing_dims_are_refused():
    with pytest.raises(UsageError, match="unknown phase 'prefil'"):
        profile_shapes(DECODER_INPUTS, SHAPES, "prefil", decoder_only=True)
    with pytest.raises(UsageError, match="has 1 dims, expected 2"):
        profile_shapes({"input_ids": (None,)}, SHAPES, "prefill", decoder_only=True)


def test_num_beams_argument_overrides_the_profiles():
    profile = Profile.from_dict({"name": "t", "description": "d", "precision": "fp16", "backends": ["trt"],
                                 "parity": {"logits_atol": 0.1, "logprob_atol": 0.1, "min_token_agreement": 0.9},
                                 "tensorrt": {"shapes": {"batch": [1, 2, 8], "sequence": [1, 16, 128],
                                                         "past": [0, 16, 256]}},
                                 "generation": {"num_beams": 3}})
    assert shapes_from_profile(profile, num_beams=2).decode_rows == (1, 4, 16)


def test_kv_rows_are_capped_at_the_engines_and_the_prefill_limits_are_inclusive():
    phases = {p: profile_shapes(DECODER_INPUTS, SHAPES, p, decoder_only=True) for p in ("prefill", "decode")}
    assert kv_buffer_plan(phases, itemsize=2, rows=1000).rows == 64      # no more rows than the engine takes
    plan = kv_buffer_plan(phases, itemsize=2)
    assert (plan.prefill_rows, plan.prefill_tokens) == (16, 512)
    check_prefill(16, 512, plan)                                         # exactly the profile's maxima
    with pytest.raises(UsageError, match="17 prompts"):
        check_prefill(17, 512, plan)
    with pytest.raises(UsageError, match="prompt of 513 tokens"):
        check_prefill(16, 513, plan)
