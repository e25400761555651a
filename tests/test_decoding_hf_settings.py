"""sequence_bias, encoder_repetition_penalty, encoder_no_repeat_ngram_size and exponential_decay_length_penalty
(per call, or from a model's generation_config) against transformers 5; group beam search refused as there.

Each processor is bit-identical to its transformers class; the processor list equals `_get_logits_processor`'s;
the decoder gives the tokens (and beam scores within 1e-4) of `transformers.generate` on tiny random GPT-2,
Llama, T5 and BART models, greedy and beam, on batches of prompts of different lengths (decoder-only left-padded,
padding included in the "encoder" input ids, as transformers does); and each setting changes the outputs.
"""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from deploylm.backends.base import EncodedBatch, ModelInfo, SpecialTokens
from deploylm.decoding import processors as P
from deploylm.decoding.options import DecodingOptions
from deploylm.decoding.search import generate_ids
from deploylm.errors import UsageError
from deploylm.generator import load
from deploylm.models.hf import generation_settings
from tests.helpers.hf_backend import HFBackend
from tests.helpers.hf_reference import generate_reference, hf_processors as _hf, load_hf as _load, per_prompt, same_bits
from tests.helpers.tiny_hf import build_tiny_hf

R, L, V, B = 6, 12, 40, 2
EOS = (1, 2)
SCORE_ATOL = 1e-4  # issue 3: scores within 1e-4 of transformers
PROMPTS = ["the quick brown fox jumps over the quick", "hello hello world", "one two three one two three four",
           "beam"]
MAX_NEW = 8





def hf_form(settings: dict) -> dict:
    """Settings as transformers' generate takes them (sequence_bias: a list of [list of ids, float])."""
    out = dict(settings)
    if out.get("sequence_bias") is not None:
        out["sequence_bias"] = [[list(ids), float(b)] for ids, b in DecodingOptions(
            sequence_bias=out["sequence_bias"]).sequence_bias]
    if out.get("exponential_decay_length_penalty") is not None:
        out["exponential_decay_length_penalty"] = tuple(out["exponential_decay_length_penalty"])
    return out


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    sequences = torch.randint(0, 6, (R, L), generator=g)            # a small alphabet: n-grams recur
    encoder_ids = torch.randint(0, 6, (B, 9), generator=g)
    scores = torch.randn(R, V, generator=g) * 3
    scores[0, 1] = -float("inf")                                    # a banned EOS stays banned
    return sequences, encoder_ids, scores


# -- each processor against its transformers class -----------------------------------------------------------
def _bias(seq):
    """Biases on one-token words, on words rows 0 and 1 end with, a repeated word (the last bias wins)."""
    return [[[3], -2.5], [[int(seq[0, -1]), 5], 4.0], [[int(seq[1, -2]), int(seq[1, -1]), 7], -1.5], [[3], 1.25],
            [[int(seq[2, -1]), 5], 0.5], [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1], 9.0]]


@pytest.mark.parametrize("length", [1, 2, 3, L])
def test_sequence_bias_matches_transformers(inputs, length):
    sequences, _, scores = inputs
    seq = sequences[:, :length]
    bias = _bias(sequences)
    ours = P.SequenceBias(bias, V)(seq, scores)
    theirs = _hf().SequenceBiasLogitsProcessor([[ids, float(b)] for ids, b in bias])(seq, scores)
    assert same_bits(ours, theirs) and not same_bits(ours, scores)


@pytest.mark.parametrize("penalty", [0.4, 1.7])
@pytest.mark.parametrize("rows", [B, R])
def test_encoder_repetition_penalty_matches_transformers(inputs, penalty, rows):
    sequences, encoder_ids, scores = inputs
    ours = P.EncoderRepetitionPenalty(penalty, encoder_ids, V)(sequences[:rows], scores[:rows])
    theirs = _hf().EncoderRepetitionPenaltyLogitsProcessor(penalty, encoder_ids)(sequences[:rows], scores[:rows])
    assert same_bits(ours, theirs) and not same_bits(ours, scores[:rows])


def test_encoder_repetition_penalty_ignores_ids_past_the_logits(inputs):
    sequences, encoder_ids, scores = inputs
    wide = encoder_ids.clone()
    wide[0, 2] = V + 3                                           # an embedding wider than lm_head
    ours = P.EncoderRepetitionPenalty(1.7, wide, V)(sequences, scores)
    theirs = _hf().EncoderRepetitionPenaltyLogitsProcessor(1.7, encoder_ids)(sequences, scores)
    changed = set(encoder_ids[0].tolist()) - set(wide[0].tolist())
    keep = [t for t in range(V) if t not in changed]
    assert same_bits(ours[R // B:, :], theirs[R // B:, :]) and same_bits(ours[:, keep], theirs[:, keep])


@pytest.mark.parametrize("size", [1, 2, 3, 9, 10])
@pytest.mark.parametrize("length", [1, 2, 3, L])
def test_encoder_no_repeat_ngram_matches_transformers(inputs, size, length):
    sequences, encoder_ids, scores = inputs
    seq = sequences[:, :length].clone()
    k = size - 1
    if 0 < k <= length:                                           # row 1 ends with the start of an encoder n-gram
        seq[1, length - k:] = encoder_ids[0, :k]
    ours = P.EncoderNoRepeatNGram(size, encoder_ids)(seq, scores)
    theirs = _hf().EncoderNoRepeatNGramLogitsProcessor(size, encoder_ids)(seq, scores)
    assert same_bits(ours, theirs)
    assert torch.isinf(ours[1]).any() == (size <= 9 and k <= length)


@pytest.mark.parametrize("setting", [(0, 1.5), (3, 1.5), (2, 0.7), (20, 2.0)])
@pytest.mark.parametrize("length", [4, 5, 6, 9])
def test_exponential_decay_matches_transformers(inputs, setting, length):
    sequences, _, scores = inputs
    seq = sequences[:, :length]
    ours = P.ExponentialDecayLength(setting, EOS, 4, V)(seq, scores)
    theirs = _hf().ExponentialDecayLengthPenalty(setting, list(EOS), 4)(seq, scores)
    assert same_bits(ours, theirs)
    assert same_bits(ours, scores) == (length <= setting[0] + 4)
    assert ours[0, 1] == -float("inf")


@pytest.mark.parametrize("make, needle", [
    (lambda ids: P.SequenceBias([[[3, V], 1.0]], V), "outside the vocabulary"),
    (lambda ids: P.SequenceBias([[[3], "x"]], V), "sequence_bias"),
    (lambda ids: P.SequenceBias({(): 1.0}, V), "sequence_bias"),
    (lambda ids: P.EncoderRepetitionPenalty(0.0, ids, V), "encoder_repetition_penalty"),
    (lambda ids: P.EncoderNoRepeatNGram(0, ids), "encoder_no_repeat_ngram_size"),
    (lambda ids: P.ExponentialDecayLength((1,), EOS, 1, V), "exponential_decay_length_penalty"),
    (lambda ids: P.ExponentialDecayLength((-1, 1.5), EOS, 1, V), "exponential_decay_length_penalty"),
    (lambda ids: P.ExponentialDecayLength((1, 0), EOS, 1, V), "exponential_decay_length_penalty"),
])
def test_constructors_validate(inputs, make, needle):
    with pytest.raises(UsageError, match=needle):
        make(inputs[1])


# -- the processor list against transformers' _get_logits_processor ------------------------------------------
MODEL_SETTINGS = dict(sequence_bias=[[[3], -2.5], [[4, 5], 1.5]], encoder_repetition_penalty=1.4,
                      encoder_no_repeat_ngram_size=2, exponential_decay_length_penalty=[2, 1.3],
                      bad_words_ids=[[6]], forced_eos_token_id=[1, 2], suppress_tokens=[8], begin_suppress_tokens=[9])


def _hf_processors(settings: dict, call: dict, prompt_len: int, encoder_ids):
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=8, n_layer=1, n_head=2, eos_token_id=1, pad_token_id=0))
    config = GenerationConfig(**hf_form({**settings, **call}), eos_token_id=list(EOS), pad_token_id=0)
    model._prepare_special_tokens(config, device="cpu")
    model._prepare_generated_length(config, has_default_max_length=False, has_default_min_length=True,
                                    model_input_name="input_ids", input_ids_length=prompt_len, inputs_tensor=None)
    return model._get_logits_processor(config, input_ids_seq_length=prompt_len, encoder_input_ids=encoder_ids,
                                       device="cpu")


HF_NAMES = {P.SequenceBias: "SequenceBiasLogitsProcessor",
            P.EncoderRepetitionPenalty: "EncoderRepetitionPenaltyLogitsProcessor",
            P.RepetitionPenalty: "RepetitionPenaltyLogitsProcessor", P.NoRepeatNGram: "NoRepeatNGramLogitsProcessor",
            P.EncoderNoRepeatNGram: "EncoderNoRepeatNGramLogitsProcessor", P.BadWords: "NoBadWordsLogitsProcessor",
            P.ForcedEOS: "ForcedEOSTokenLogitsProcessor", P.ExponentialDecayLength: "ExponentialDecayLengthPenalty",
            P.TopK: "TopKLogitsWarper"}


def _hf_name(processor) -> str:
    if isinstance(processor, P.SuppressTokens):
        return "SuppressTokensAtBeginLogitsProcessor" if processor.begin_index is not None \
            else "SuppressTokensLogitsProcessor"
    return HF_NAMES[type(processor)]


@pytest.mark.parametrize("prompt_len", [1, 4])
@pytest.mark.parametrize("call", [
    dict(num_beams=2, max_new_tokens=6, repetition_penalty=1.2, no_repeat_ngram_size=2),
    dict(num_beams=3, max_new_tokens=7, do_sample=True, top_k=2, encoder_repetition_penalty=0.6,
         sequence_bias=[[[7], 2.0]], exponential_decay_length_penalty=[0, 1.1], encoder_no_repeat_ngram_size=1),
], ids=["model-settings", "call-overrides"])
def test_processor_list_equals_transformers_at_every_length(inputs, call, prompt_len):
    sequences, encoder_ids, scores = inputs
    options = DecodingOptions(**call)
    info = ModelInfo(False, V, SpecialTokens(EOS, 0), generation=generation_settings(MODEL_SETTINGS))
    ours = P.build_processors(options, info, prompt_len, encoder_input_ids=encoder_ids)
    theirs = _hf_processors(MODEL_SETTINGS, call, prompt_len, encoder_ids)
    assert [_hf_name(p) for p in ours] == [type(p).__name__ for p in theirs]
    for length in range(prompt_len, prompt_len + options.max_new_tokens):
        seq = sequences[:, :length]
        assert same_bits(ours(seq, scores), theirs(seq, scores.clone())), f"length {length}"


def test_generation_settings_carry_the_new_keys_and_leave_off_values_out():
    gen = {**MODEL_SETTINGS, "num_beam_groups": 1, "diversity_penalty": 0.5}
    assert generation_settings(gen) == {
        "sequence_bias": (((3,), -2.5), ((4, 5), 1.5)), "encoder_repetition_penalty": 1.4,
        "encoder_no_repeat_ngram_size": 2, "exponential_decay_length_penalty": (2, 1.3), "bad_words_ids": ((6,),),
        "forced_eos_token_id": (1, 2), "suppress_tokens": (8,), "begin_suppress_tokens": (9,)}
    off = dict(encoder_repetition_penalty=1.0, encoder_no_repeat_ngram_size=0, sequence_bias=[], num_beam_groups=1)
    assert generation_settings(off) == {}
    assert generation_settings({"num_beam_groups": 2})["num_beam_groups"] == 2
    assert generation_settings({"sequence_bias": {(4, 5): 1.5}}) == {"sequence_bias": (((4, 5), 1.5),)}


# -- per-call options against transformers.generate ----------------------------------------------------------
@pytest.fixture(scope="module")
def models(tiny_gpt2_dir, tiny_llama_dir, tiny_t5_dir, tmp_path_factory):
    bart = build_tiny_hf("bart", tmp_path_factory.mktemp("bart"))
    out = {"gpt2": _load(tiny_gpt2_dir), "llama": _load(tiny_llama_dir), "t5": _load(tiny_t5_dir), "bart": _load(bart)}
    with torch.no_grad():   # the tiny T5 otherwise generates nothing but its pad token (0): nothing to change
        out["t5"][0].get_output_embeddings().weight[0] = 0
    return out


def _text_batch(model, tokenizer) -> EncodedBatch:
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    return EncodedBatch(enc.input_ids, enc.attention_mask)


def _echo_batch(model, tokenizer) -> EncodedBatch:
    """Prompts that hold what the model generates for PROMPTS: its first 4 tokens, then the prompt's last token
    followed by the first generated one (a bigram to ban), then the prompt; padded as `tokenizer` pads."""
    batch = _text_batch(model, tokenizer)
    rows = []
    for ids, mask, out in zip(batch.input_ids.tolist(), batch.attention_mask.tolist(), _greedy_tokens(model, batch)):
        prompt = [t for t, m in zip(ids, mask) if m]
        rows.append(out[:4] + [prompt[-1], out[0]] + prompt)
    n, pad, right = max(map(len, rows)), tokenizer.pad_token_id, tokenizer.padding_side == "right"
    ids = [r + [pad] * (n - len(r)) if right else [pad] * (n - len(r)) + r for r in rows]
    mask = [[1] * len(r) + [0] * (n - len(r)) if right else [0] * (n - len(r)) + [1] * len(r) for r in rows]
    return EncodedBatch(torch.tensor(ids), torch.tensor(mask))


def _start(model, batch) -> int:
    return 1 if model.config.is_encoder_decoder else batch.input_ids.shape[1]


def _greedy_tokens(model, batch) -> list[list[int]]:
    out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=False,
                         num_beams=1, max_new_tokens=MAX_NEW)
    return out[:, _start(model, batch):].tolist()


def _most_common(items):
    return max(set(items), key=lambda t: (items.count(t), t))


def _extra_eos(model, batch, eos) -> int:
    """A token greedy decoding often produces after the first step: made a second EOS, so length matters."""
    return _most_common([t for row in _greedy_tokens(model, batch) for t in row[1:] if t not in eos])


def _sequence_bias(greedy):
    return dict(sequence_bias=[
        [[_most_common([row[0] for row in greedy])], -4.0],                                  # the usual first token
        [list(_most_common([tuple(row[i:i + 2]) for row in greedy for i in range(1, MAX_NEW - 1)])), -6.0],
        [[_most_common([t for row in greedy for t in row]) + 1], 1.5]])


# name -> (settings from the greedy outputs, batches to try, a frequent token made a second EOS)
SETTINGS = {
    "sequence_bias": (_sequence_bias, ("text",), False),
    "encoder_repetition_penalty=2.5": (lambda greedy: dict(encoder_repetition_penalty=2.5), ("text", "echo"), False),
    "encoder_repetition_penalty=0.3": (lambda greedy: dict(encoder_repetition_penalty=0.3), ("text", "echo"), False),
    "encoder_no_repeat_ngram_size=1": (lambda greedy: dict(encoder_no_repeat_ngram_size=1), ("text", "echo"), False),
    "encoder_no_repeat_ngram_size=2": (lambda greedy: dict(encoder_no_repeat_ngram_size=2), ("text", "echo"), False),
    "exponential_decay=(2,1.6)": (lambda greedy: dict(exponential_decay_length_penalty=(2, 1.6)), ("text",), True),
    "exponential_decay=(1,0.5)": (lambda greedy: dict(exponential_decay_length_penalty=(1, 0.5)), ("text",), True),
}
BATCHES = {"text": _text_batch, "echo": _echo_batch}
BEAM = dict(num_beams=4)
SEARCHES = {"greedy": dict(num_beams=1), "beam": BEAM,
            "beam-lp2-n2": dict(num_beams=4, num_return_sequences=2, length_penalty=2.0, early_stopping="never")}


def _run(model, batch: EncodedBatch, settings: dict, search: dict, extra_eos: bool):
    """(ours, transformers') hypotheses for the batch, beam scores checked within SCORE_ATOL when tokens agree."""
    backend = HFBackend(model)
    eos = backend.info.special.eos_token_ids
    if extra_eos:
        eos = eos + (_extra_eos(model, batch, eos),)
        backend.info = dataclasses.replace(backend.info, special=dataclasses.replace(backend.info.special,
                                                                                     eos_token_ids=eos))
    options = DecodingOptions(max_new_tokens=MAX_NEW, **search, **settings)
    out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=False,
                         max_new_tokens=MAX_NEW, eos_token_id=list(eos), pad_token_id=backend.info.special.pad_token_id,
                         output_scores=True, return_dict_in_generate=True, **search, **hf_form(settings))
    ours = [[h.token_ids for h in per] for per in generate_ids(backend, batch, options)]
    theirs = per_prompt(out.sequences[:, _start(model, batch):].tolist(), eos, options.num_return_sequences)
    if options.num_beams > 1 and ours == theirs:
        scores = torch.tensor([h.score for per in generate_ids(backend, batch, options) for h in per])
        torch.testing.assert_close(scores, out.sequences_scores.float(), atol=SCORE_ATOL, rtol=0)
    return ours, theirs


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_per_call_settings_match_transformers_and_change_the_outputs(models, setting):
    """Every model x search x batch: our tokens are transformers'; the setting changes them for 2+ models."""
    make, batches, extra_eos = SETTINGS[setting]
    changed = set()
    for kind, (model, tokenizer) in models.items():
        for batch_name in batches:
            batch = BATCHES[batch_name](model, tokenizer)
            settings = make(_greedy_tokens(model, batch))
            for search_name, search in SEARCHES.items():
                ours, theirs = _run(model, batch, settings, search, extra_eos)
                assert ours == theirs, (kind, batch_name, search_name)
                if ours != _run(model, batch, {}, search, extra_eos)[0]:
                    changed.add(kind)
    assert len(changed) >= 2, f"{setting} changes the outputs of {sorted(changed)} only: the comparison is weak"


# -- from a model's generation_config ------------------------------------------------------------------------
def _configured(src, dest, settings: dict):
    model, tokenizer = _load(src)
    for key, value in hf_form(settings).items():
        setattr(model.generation_config, key, value)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


MODEL_CASES = {  # kind -> settings its generation_config carries
    "gpt2": dict(encoder_repetition_penalty=2.5, sequence_bias=[[[5], -3.0], [[7, 9], 2.0]]),
    "t5": dict(encoder_no_repeat_ngram_size=1, exponential_decay_length_penalty=[2, 1.6]),
    "bart": dict(encoder_repetition_penalty=0.3, exponential_decay_length_penalty=[1, 1.8]),
}


@pytest.fixture(scope="module")
def configured(models, tiny_gpt2_dir, tiny_t5_dir, tmp_path_factory):
    """kind -> (deploylm Generator, transformers model) of a copy whose generation_config sets MODEL_CASES[kind]."""
    out = {}
    for kind, settings in MODEL_CASES.items():
        model, tokenizer = models[kind]
        path = tmp_path_factory.mktemp(f"{kind}-configured")
        model.save_pretrained(path / "plain")
        tokenizer.save_pretrained(path / "plain")
        dest = _configured(path / "plain", path / "configured", settings)
        out[kind] = (load(dest), _load(dest)[0])
    return out


@pytest.mark.parametrize("search", list(SEARCHES))
@pytest.mark.parametrize("kind", list(MODEL_CASES))
def test_model_settings_match_transformers(configured, kind, search):
    gen, model = configured[kind]
    settings = MODEL_CASES[kind]
    assert dict(gen.info.generation) == generation_settings(hf_form(settings))
    expected, out = generate_reference(model, gen.tokenizer, PROMPTS, MAX_NEW, SEARCHES[search])
    results = gen.generate(PROMPTS, max_new_tokens=MAX_NEW, **SEARCHES[search])
    assert [[s.token_ids for s in r.sequences] for r in results] == expected
    if SEARCHES[search]["num_beams"] > 1:
        scores = torch.tensor([s.score for r in results for s in r.sequences])
        torch.testing.assert_close(scores, out.sequences_scores.float(), atol=SCORE_ATOL, rtol=0)
    plain = gen.backend.info
    gen.backend.info = dataclasses.replace(plain, generation={})
    try:
        without = gen.generate(PROMPTS, max_new_tokens=MAX_NEW, **SEARCHES[search])
    finally:
        gen.backend.info = plain
    assert [r.sequences for r in results] != [r.sequences for r in without]


@pytest.mark.parametrize("kind", list(MODEL_CASES))
def test_a_call_value_replaces_the_models(configured, kind):
    """As a generate() keyword replaces the generation_config's: here each setting turned off for the call."""
    gen, model = configured[kind]
    off = {"encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0,
           "exponential_decay_length_penalty": (0, 1.0)}
    call = {k: v for k, v in off.items() if k in MODEL_CASES[kind]}
    theirs_call = dict(call)
    if "sequence_bias" in MODEL_CASES[kind]:
        call["sequence_bias"] = []                           # ours: empty = no bias
        theirs_call["sequence_bias"] = [[[5], 0.0]]          # theirs refuses an empty one: a zero bias
    expected, _ = generate_reference(model, gen.tokenizer, PROMPTS, MAX_NEW, {**BEAM, **hf_form(theirs_call)})
    results = gen.generate(PROMPTS, max_new_tokens=MAX_NEW, **BEAM, **call)
    assert [[s.token_ids for s in r.sequences] for r in results] == expected
    with_model, _ = generate_reference(model, gen.tokenizer, PROMPTS, MAX_NEW, BEAM)
    assert expected != with_model




@pytest.mark.parametrize("search", list(SEARCHES))
def test_a_model_min_new_tokens_above_the_calls_max_new_tokens_runs_as_transformers(models, tmp_path, search):
    """generation_config min_new_tokens=6 and a call for 3 tokens: EOS banned to the end, as transformers' generate
    (it was refused as "max_new_tokens must be >= min_new_tokens=6", a number the caller never gave)."""
    model, tokenizer = models["gpt2"]
    model.save_pretrained(tmp_path / "plain")
    tokenizer.save_pretrained(tmp_path / "plain")
    dest = _configured(tmp_path / "plain", tmp_path / "min6", dict(min_new_tokens=6))
    gen, theirs = load(dest), _load(dest)[0]
    expected, _ = generate_reference(theirs, gen.tokenizer, PROMPTS, 3, SEARCHES[search])
    results = gen.generate(PROMPTS, max_new_tokens=3, **SEARCHES[search])
    assert [[s.token_ids for s in r.sequences] for r in results] == expected
    assert all(len(s.token_ids) == 3 for r in results for s in r.sequences)


# -- group beam search: refused, as transformers 5 refuses it -------------------------------------------------
@pytest.mark.parametrize("option", [dict(num_beam_groups=2), dict(diversity_penalty=0.5)])
def test_group_beam_search_options_are_refused_with_one_line(option):
    for attempt in (lambda: DecodingOptions.from_mapping(option), lambda: DecodingOptions().replace(**option)):
        with pytest.raises(UsageError) as err:
            attempt()
        assert "group beam search" in str(err.value) and "trust_remote_code" in str(err.value)
        assert "\n" not in str(err.value)


def test_model_with_num_beam_groups_refuses_beam_search_like_transformers(models, tmp_path):
    model, tokenizer = models["gpt2"]
    model.save_pretrained(tmp_path / "plain")
    tokenizer.save_pretrained(tmp_path / "plain")
    dest = _configured(tmp_path / "plain", tmp_path / "groups", dict(num_beam_groups=2, diversity_penalty=0.5))
    assert json.loads((dest / "generation_config.json").read_text())["num_beam_groups"] == 2
    gen, theirs = load(dest), _load(dest)[0]
    enc = gen.tokenizer(PROMPTS[:1], return_tensors="pt")
    with pytest.raises(ValueError, match="trust_remote_code"):
        theirs.generate(**enc, num_beams=4, max_new_tokens=2)
    with pytest.raises(UsageError, match="num_beam_groups=2.*group beam search") as err:
        gen.generate(PROMPTS[:1], num_beams=4, max_new_tokens=2)
    # the advice is what this model decodes with (num_beams=1), not plain beam search, which it refuses too
    assert str(err.value).endswith("; decode it with num_beams=1 (greedy or sampling: the groups then change "
                                   "nothing, as in transformers)") and "plain beam search" not in str(err.value)
    greedy = theirs.generate(**enc, num_beams=1, max_new_tokens=4)    # greedy ignores the groups, as ours
    [result] = gen.generate(PROMPTS[:1], num_beams=1, max_new_tokens=4)
    assert list(result.sequences[0].token_ids) == greedy[0, enc.input_ids.shape[1]:].tolist()


# -- hand-written probability tables (scripted backend): the effect of each setting, by hand ------------------
# vocab: 0 pad (never generated), 1 EOS, 2-4 words; a table row is keyed by the generated tokens only
def _tables(table, default=(0, 1.0, 0, 0, 0)):
    from tests.helpers.scripted_backend import ScriptedBackend, table_script

    return ScriptedBackend(table_script(table, default), vocab_size=5)


def _ours(backend, prompts, **options):
    from tests.helpers.scripted_backend import encode

    options = DecodingOptions(**{"num_beams": 1, "max_new_tokens": 5, **options})
    return [[(h.token_ids, h.score) for h in per] for per in generate_ids(backend, encode(prompts), options)]


def _tokens(backend, prompts, **options):
    return [per[0][0] for per in _ours(backend, prompts, **options)]


def test_table_sequence_bias():
    # first step: 2 (p .5) over 3 (p .4); after 3, EOS (p .6) over 4 (p .2)
    backend = _tables({(): (0, .1, .5, .4, 0), (2,): (0, .6, .1, .1, .2), (3,): (0, .6, .1, .1, .2)})
    assert _tokens(backend, [[4]]) == [(2, 1)]
    bias = [[[2], -1.0], [[3, 4], 2.0]]     # log .5 - 1 < log .4; after 3: log .2 + 2 > log .6
    assert _tokens(backend, [[4]], sequence_bias=bias) == [(3, 4, 1)]
    assert _tokens(backend, [[4]], sequence_bias=bias[:1]) == [(3, 1)]          # the two-token bias did the 4
    # beam search adds the biased log-probs: the best hypothesis scores (log .4 + log .2 + 2 + log 1) / 3
    [[(tokens, score), _]] = _ours(backend, [[4]], num_beams=2, num_return_sequences=2, sequence_bias=bias)
    assert tokens == (3, 4, 1) and score == pytest.approx((math.log(.4) + math.log(.2) + 2.0) / 3, abs=1e-6)


def test_table_encoder_repetition_penalty_favours_each_rows_own_prompt_tokens():
    backend = _tables({(): (0, .1, .5, .4, 0)})
    assert _tokens(backend, [[3], [4, 4]]) == [(2, 1), (2, 1)]
    # penalty 2: a prompt token's log-prob is halved (log .4 / 2 > log .5) -- only in the row whose prompt has 3
    assert _tokens(backend, [[3], [4, 4]], encoder_repetition_penalty=2.0) == [(3, 1), (2, 1)]
    # penalty 0.5 doubles it: the prompt token 2 (log .5 * 2 < log .4) loses to 3
    assert _tokens(backend, [[2]], encoder_repetition_penalty=0.5) == [(3, 1)]


def test_table_encoder_no_repeat_ngram_size():
    backend = _tables({(): (0, .1, .5, .2, .2), (2,): (0, .1, .1, .5, .3)})
    assert _tokens(backend, [[2, 3, 4]]) == [(2, 3, 1)]
    assert _tokens(backend, [[2, 3, 4]], encoder_no_repeat_ngram_size=2) == [(2, 4, 1)]   # (2, 3) is the prompt's
    assert _tokens(backend, [[2, 3, 4]], encoder_no_repeat_ngram_size=1) == [(1,)]        # every prompt token banned
    assert _tokens(backend, [[2, 3, 4]], encoder_no_repeat_ngram_size=3) == [(2, 3, 1)]   # (4, 2, 3) is not


def test_table_exponential_decay_length_penalty():
    backend = _tables({}, default=(0, .1, .4, .3, .2))
    assert _tokens(backend, [[3]]) == [(2, 2, 2, 2, 2)]
    # after start=1 generated tokens, EOS's score s gets |s| * (2 ** k - 1): at k = 1 it is 0, the best
    assert _tokens(backend, [[3]], exponential_decay_length_penalty=(1, 2.0)) == [(2, 2, 1)]
    assert _tokens(backend, [[3, 3, 3]], exponential_decay_length_penalty=(3, 2.0)) == [(2, 2, 2, 2, 1)]
    # a factor < 1 pushes EOS down instead: log .5 - |log .5| / 2 < log .4
    backend = _tables({(): (0, .1, .6, .3, 0), (2,): (0, .5, .1, .4, 0)})
    assert _tokens(backend, [[3]]) == [(2, 1)]
    assert _tokens(backend, [[3]], exponential_decay_length_penalty=(0, 0.5)) == [(2, 3, 1)]


# -- deploylm generate flags ---------------------------------------------------------------------------------
def _cli(*args: str):
    from click.testing import CliRunner

    from deploylm.cli import cli
    return CliRunner().invoke(cli, ["generate", *args])


def test_generate_flags_reach_the_decoder(tiny_llama_dir):
    assert all(flag in _cli("--help").output for flag in (
        "--sequence-bias", "--encoder-repetition-penalty", "--encoder-no-repeat-ngram-size",
        "--exponential-decay-length-penalty"))
    flags = ["--sequence-bias", "[[[5], -3.0], [[7, 9], 2.0]]", "--encoder-repetition-penalty", "2.5",
             "--encoder-no-repeat-ngram-size", "2", "--exponential-decay-length-penalty", "1,1.5"]
    options = dict(sequence_bias=[[[5], -3.0], [[7, 9], 2.0]], encoder_repetition_penalty=2.5,
                   encoder_no_repeat_ngram_size=2, exponential_decay_length_penalty=(1, 1.5))
    out = _cli("--model", str(tiny_llama_dir), "--json", "--num-beams", "2", "--max-new-tokens", "6", *flags,
               *PROMPTS[:2])
    assert out.exit_code == 0, out.output
    gen = load(tiny_llama_dir)
    expected = gen.generate(PROMPTS[:2], num_beams=2, max_new_tokens=6, **options)
    assert [[o["token_ids"] for o in json.loads(line)["outputs"]] for line in out.stdout.splitlines()] == [
        [list(s.token_ids) for s in r.sequences] for r in expected]
    assert expected != gen.generate(PROMPTS[:2], num_beams=2, max_new_tokens=6)


@pytest.mark.parametrize("flags, needle", [
    (["--sequence-bias", "[[[5], -3.0]"], "--sequence-bias '[[[5], -3.0]': expected JSON"),
    (["--sequence-bias", "[[5, -3.0]]"], "--sequence-bias [[5, -3.0]] is invalid"),
    (["--sequence-bias", "[[[100000], 1.0]]"], "--sequence-bias has token(s) [100000] outside the vocabulary"),
    (["--exponential-decay-length-penalty", "3"], "expected START,FACTOR"),
    (["--exponential-decay-length-penalty", "3,0"], "--exponential-decay-length-penalty '3,0': expected START,FACTOR "
                                                    "with START an integer >= 0 and FACTOR a number > 0, e.g. 8,1.5"),
    (["--exponential-decay-length-penalty", "-1,1.5"], "'-1,1.5': expected START,FACTOR"),
    (["--exponential-decay-length-penalty", "3,nan"], "'3,nan': expected START,FACTOR"),
    (["--encoder-repetition-penalty", "0"], "--encoder-repetition-penalty 0.0"),
    (["--encoder-no-repeat-ngram-size", "-1"], "--encoder-no-repeat-ngram-size -1"),
    (["--num-beam-groups", "2"], "--num-beam-groups: group beam search"),
    (["--diversity-penalty", "0.5"], "trust_remote_code"),
])
def test_bad_flag_values_are_one_line_errors(tiny_llama_dir, flags, needle):
    out = _cli("--model", str(tiny_llama_dir), *flags, "hello")
    assert out.exit_code == 2 and out.stdout == "", out.output
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], out.stderr
    assert "[8, 1.5]" not in out.stderr          # the API's list form, which the flag does not take


def test_a_bad_exponential_decay_keeps_its_list_form_in_python(tiny_llama_dir):
    with pytest.raises(UsageError, match=r"exponential_decay_length_penalty=\(3, 0\) is invalid: .*e\.g\. \[8, 1\.5\]$"):
        load(tiny_llama_dir).generate("hello", exponential_decay_length_penalty=(3, 0))
