"""Decoding settings a model's generation_config carries (bad_words_ids, min_length, forced_bos/eos_token_id,
suppress_tokens, begin_suppress_tokens): each processor is bit-identical to its transformers class, the
processor list equals `_get_logits_processor`'s, and `deploylm.load(...).generate` gives the tokens (and
scores) of `transformers.generate` on tiny random BART, Marian and GPT-2 models that set them.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from deploylm.backends.base import ModelInfo, SpecialTokens
from deploylm.decoding import processors as P
from deploylm.decoding.options import DecodingOptions
from deploylm.errors import UsageError
from deploylm.generator import load
from deploylm.models.hf import generation_settings
from tests.helpers.hf_reference import generate_reference, hf_processors as _hf, same_bits
from tests.helpers.tiny_hf import build_tiny_hf

R, L, V = 6, 12, 40
EOS = (1, 2)
SCORE_ATOL = 1e-4  # issue 3: scores within 1e-4 of transformers
PROMPTS = ["the quick brown fox jumps over", "hello", "one two three four five six seven eight", "beam search"]
MAX_NEW = 8





@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    sequences = torch.randint(0, 6, (R, L), generator=g)           # a small alphabet: n-grams recur
    scores = torch.randn(R, V, generator=g) * 3
    return sequences, scores


# -- each processor against its transformers class -----------------------------------------------------
BAD_WORDS = [[3], [1], [4, 5], [2, 2, 5], [4, 5], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0]]  # EOS, repeat, too long


def _ending_words(seq):
    """Two- and three-token words that rows 0 and 1 of `seq` are about to complete."""
    words = [[int(seq[0, -1]), 5]]
    return words + ([[int(seq[1, -2]), int(seq[1, -1]), 6]] if seq.shape[1] > 1 else [])


@pytest.mark.parametrize("length", [1, 2, 3, L])
@pytest.mark.parametrize("make_words", [lambda seq: BAD_WORDS + _ending_words(seq), lambda seq: [[7], [3]],
                                        _ending_words], ids=["mixed", "single", "multi"])
def test_bad_words_match_transformers(inputs, length, make_words):
    sequences, scores = inputs
    seq = sequences[:, :length]
    words = make_words(seq)
    ours = P.BadWords(words, EOS, V)(seq, scores)
    theirs = _hf().NoBadWordsLogitsProcessor(words, list(EOS))(seq, scores)
    assert same_bits(ours, theirs)
    assert torch.isinf(ours[0]).any() and (length == 1 or torch.isinf(ours[1]).any())


@pytest.mark.parametrize("make, theirs", [
    (lambda: P.MinLength(5, EOS), lambda hf: hf.MinLengthLogitsProcessor(5, list(EOS))),
    (lambda: P.ForcedBOS(7), lambda hf: hf.ForcedBOSTokenLogitsProcessor(7)),
    (lambda: P.ForcedEOS(6, EOS), lambda hf: hf.ForcedEOSTokenLogitsProcessor(6, list(EOS))),
    (lambda: P.ForcedEOS(6, 3), lambda hf: hf.ForcedEOSTokenLogitsProcessor(6, 3)),
    (lambda: P.SuppressTokens([3, 9, V + 4], V), lambda hf: hf.SuppressTokensLogitsProcessor([3, 9, V + 4])),
    (lambda: P.SuppressTokens([3, 9], V, begin_index=5),
     lambda hf: hf.SuppressTokensAtBeginLogitsProcessor([3, 9], 5)),
], ids=["min_length", "forced_bos", "forced_eos", "forced_eos_int", "suppress", "begin_suppress"])
@pytest.mark.parametrize("length", [1, 2, 4, 5, 6])
def test_processors_match_transformers(inputs, make, theirs, length):
    sequences, scores = inputs
    seq = sequences[:, :length]
    assert same_bits(make()(seq, scores), theirs(_hf())(seq, scores.clone()))


@pytest.mark.parametrize("make, name", [
    (lambda: P.BadWords([], EOS, V), "bad_words_ids"),
    (lambda: P.BadWords([[3], []], EOS, V), "bad_words_ids"),
    (lambda: P.BadWords([[3, -1]], EOS, V), "bad_words_ids"),
    (lambda: P.BadWords([[3, V]], EOS, V), "bad_words_ids has token"),
    (lambda: P.MinLength(-1, EOS), "min_length"),
    (lambda: P.ForcedBOS([1, 2]), "forced_bos_token_id"),
    (lambda: P.ForcedEOS(5, "x"), "forced_eos_token_id"),
    (lambda: P.SuppressTokens([1.5], V), "suppress_tokens"),
    (lambda: P.SuppressTokens(None, V, begin_index=1), "begin_suppress_tokens"),
])
def test_constructors_validate(make, name):
    with pytest.raises(UsageError, match=name):
        make()


# -- the processor list against transformers' _get_logits_processor ----------------------------------
MODEL_SETTINGS = dict(bad_words_ids=[[3], [4, 5]], min_length=6, forced_bos_token_id=7, forced_eos_token_id=[1, 2],
                      suppress_tokens=[8], begin_suppress_tokens=[9, 4])


def _hf_processors(settings: dict, options: DecodingOptions, prompt_len: int):
    """transformers' processor list for a decoder-only model with `settings` in its generation config."""
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=8, n_layer=1, n_head=2, eos_token_id=1, pad_token_id=0))
    call = {k: v for k, v in options.to_dict().items() if k not in ("seed", "max_time", "min_new_tokens")}
    if options.min_new_tokens is not None:   # deploylm's None means "not given" (0 is given: no minimum)
        call["min_new_tokens"] = options.min_new_tokens
    config = GenerationConfig(**settings, **call, eos_token_id=list(EOS), pad_token_id=0)
    model._prepare_special_tokens(config, device="cpu")
    model._prepare_generated_length(config, has_default_max_length=False,
                                    has_default_min_length="min_length" not in settings, model_input_name="input_ids",
                                    input_ids_length=prompt_len, inputs_tensor=None)
    return model._get_logits_processor(config, input_ids_seq_length=prompt_len, device="cpu")


@pytest.mark.parametrize("prompt_len", [1, 4])
@pytest.mark.parametrize("options", [
    DecodingOptions(num_beams=2, max_new_tokens=6, repetition_penalty=1.2, no_repeat_ngram_size=2),
    DecodingOptions(num_beams=1, max_new_tokens=5, min_new_tokens=3, do_sample=True, temperature=0.5, top_k=3,
                    top_p=0.9),
    DecodingOptions(num_beams=3, max_new_tokens=7, min_new_tokens=1, do_sample=True, top_k=2),
    DecodingOptions(num_beams=2, max_new_tokens=6, min_new_tokens=0),     # given 0: the model's min_length is off
], ids=["beam", "sample-min-new", "beam-sample", "min-new-0"])
def test_processor_list_equals_transformers_at_every_length(inputs, options, prompt_len):
    sequences, scores = inputs
    info = ModelInfo(False, V, SpecialTokens(EOS, 0), generation=generation_settings(MODEL_SETTINGS))
    ours = P.build_processors(options, info, prompt_len)
    theirs = _hf_processors(MODEL_SETTINGS, options, prompt_len)
    for length in range(prompt_len, prompt_len + options.max_new_tokens):
        seq = sequences[:, :length]
        assert same_bits(ours(seq, scores), theirs(seq, scores.clone())), f"length {length}"
    if options.min_new_tokens is None:  # otherwise transformers adds a MinLength that bans what MinNewTokens bans
        assert [_hf_name(p) for p in ours] == [type(p).__name__ for p in theirs]


def _hf_name(processor) -> str:
    if isinstance(processor, P.SuppressTokens):
        at_begin = processor.begin_index is not None
        return "SuppressTokensAtBeginLogitsProcessor" if at_begin else "SuppressTokensLogitsProcessor"
    return {P.RepetitionPenalty: "RepetitionPenaltyLogitsProcessor", P.NoRepeatNGram: "NoRepeatNGramLogitsProcessor",
            P.BadWords: "NoBadWordsLogitsProcessor", P.MinLength: "MinLengthLogitsProcessor",
            P.MinNewTokens: "MinNewTokensLengthLogitsProcessor", P.ForcedBOS: "ForcedBOSTokenLogitsProcessor",
            P.ForcedEOS: "ForcedEOSTokenLogitsProcessor", P.Temperature: "TemperatureLogitsWarper",
            P.TopK: "TopKLogitsWarper", P.TopP: "TopPLogitsWarper"}[type(processor)]


def test_generation_settings_keep_only_the_decoding_keys():
    gen = {**MODEL_SETTINGS, "num_beams": 4, "min_length": 0, "suppress_tokens": [], "forced_bos_token_id": 0}
    assert generation_settings(gen) == {"bad_words_ids": ((3,), (4, 5)), "forced_bos_token_id": 0,
                                        "forced_eos_token_id": (1, 2), "begin_suppress_tokens": (9, 4)}


# -- end to end against transformers.generate ----------------------------------------------------------
def _auto(path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if AutoConfig.from_pretrained(path).is_encoder_decoder else AutoModelForCausalLM


def _greedy(model, tokenizer) -> tuple[list[list[int]], int]:
    """Greedy outputs (generated tokens) and the running sequence's length before them."""
    enc_dec = model.config.is_encoder_decoder
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="right" if enc_dec else "left")
    out = model.generate(**enc, do_sample=False, num_beams=1, max_new_tokens=MAX_NEW)
    start = 1 if enc_dec else enc.input_ids.shape[1]
    return out[:, start:].tolist(), start


def with_settings(src, dest, pick):
    """A copy of the model at `src` whose generation_config gets `pick(greedy outputs, model, prompt length)`.

    `boost` in the settings (popped) names a token whose output row then tracks (x1.1) the token that greedy
    decoding under the settings most often produces at generated positions 2-3, so it is wanted early.
    """
    from transformers import AutoTokenizer

    model = _auto(src).from_pretrained(src).eval()
    tokenizer = AutoTokenizer.from_pretrained(src)
    greedy, prompt_len = _greedy(model, tokenizer)
    settings = pick(greedy, model, prompt_len)
    boost = settings.pop("boost", None)
    for key, value in settings.items():
        setattr(model.generation_config, key, value)
    if boost is not None:
        greedy, _ = _greedy(model, tokenizer)
        target = _most_common([t for row in greedy for t in row[2:4] if t != boost])
        with torch.no_grad():
            weight = model.get_output_embeddings().weight
            weight[boost] = weight[target] * 1.1
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest, settings


def _most_common(tokens: list) -> object:
    return max(set(tokens), key=lambda t: (tokens.count(t), t))


def _first(greedy):
    """The token greedy decoding most often starts with."""
    return _most_common([row[0] for row in greedy])


def _later(greedy):
    """The token greedy decoding most often produces after the first step (not its usual first token)."""
    return _most_common([t for row in greedy for t in row[1:] if t != _first(greedy)])


def _bigram(greedy):
    """A (a, b) pair greedy decoding produced (a banned two-token word that matters)."""
    return list(_most_common([(row[i], row[i + 1]) for row in greedy for i in range(1, len(row) - 1)]))


PICKS = {  # (greedy outputs, model, prompt length) -> generation_config settings
    # forced BOS + forced EOS + single- and multi-token bad words + begin_suppress (after the forced BOS) + min_length
    "bart": lambda greedy, model, p: dict(forced_bos_token_id=5, forced_eos_token_id=model.config.eos_token_id,
                                          bad_words_ids=[[_first(greedy)], _bigram(greedy)],
                                          begin_suppress_tokens=[model.config.eos_token_id, 6], min_length=p + 4,
                                          boost=model.config.eos_token_id),
    # Marian's own setting: never generate the pad token (here made the model's favourite), EOS forced at the end
    "marian": lambda greedy, model, p: dict(bad_words_ids=[[model.config.pad_token_id]], forced_eos_token_id=1,
                                            boost=model.config.pad_token_id),
    # decoder-only: suppress a frequent token, ban the usual first token at the start, a bigram, min_length
    "gpt2": lambda greedy, model, p: dict(suppress_tokens=[_later(greedy)], bad_words_ids=[_bigram(greedy)],
                                          begin_suppress_tokens=[_first(greedy)], min_length=p + 4,
                                          boost=model.config.eos_token_id),
}
BEAM, GREEDY = dict(num_beams=4), dict(num_beams=1)
LP2_NEVER = dict(num_beams=4, num_return_sequences=2, length_penalty=2.0, early_stopping="never")
CASES = [("bart", BEAM), ("bart", LP2_NEVER), ("bart", GREEDY), ("marian", BEAM), ("marian", GREEDY),
         ("gpt2", BEAM), ("gpt2", LP2_NEVER), ("gpt2", GREEDY)]


@pytest.fixture(scope="module")
def configured(tmp_path_factory, tiny_gpt2_dir):
    """kind -> (deploylm Generator, transformers model, the settings), one folder each."""
    out = {}
    for kind, pick in PICKS.items():
        src = tiny_gpt2_dir if kind == "gpt2" else build_tiny_hf(kind, tmp_path_factory.mktemp(kind) / "plain")
        path, settings = with_settings(src, tmp_path_factory.mktemp(kind) / "configured", pick)
        out[kind] = (load(path), _auto(path).from_pretrained(path).eval(), settings)
    return out


@pytest.mark.parametrize("kind, options", CASES, ids=[f"{k}-{'-'.join(f'{a}={b}' for a, b in o.items())}"
                                                      for k, o in CASES])
def test_generate_matches_transformers_with_model_settings(configured, kind, options):
    gen, model, settings = configured[kind]
    assert dict(gen.info.generation) == generation_settings(settings)
    expected, out = generate_reference(model, gen.tokenizer, PROMPTS, MAX_NEW, options)
    results = gen.generate(PROMPTS, max_new_tokens=MAX_NEW, **options)
    ours = [[s.token_ids for s in r.sequences] for r in results]
    assert ours == expected
    if options["num_beams"] > 1:
        scores = torch.tensor([s.score for r in results for s in r.sequences])
        torch.testing.assert_close(scores, out.sequences_scores.float(), atol=SCORE_ATOL, rtol=0)
    _check_settings_took_effect(kind, settings, [ids for per_prompt in ours for ids in per_prompt])


@pytest.mark.parametrize("kind", list(PICKS))
def test_the_settings_change_the_outputs(configured, kind):
    gen, _, settings = configured[kind]
    assert _ours_without(gen, settings, BEAM) != _ours_without(gen, [], BEAM)


def _ours_without(gen, keys, options: dict) -> list[list[tuple[int, ...]]]:
    """Our outputs with the model's settings `keys` dropped."""
    info = gen.backend.info
    gen.backend.info = dataclasses.replace(info, generation={k: v for k, v in info.generation.items() if k not in keys})
    try:
        return [[s.token_ids for s in r.sequences] for r in gen.generate(PROMPTS, max_new_tokens=MAX_NEW, **options)]
    finally:
        gen.backend.info = info


def _check_settings_took_effect(kind, settings, outputs):
    """The outputs obey the settings."""
    for ids in outputs:
        for word in settings["bad_words_ids"]:
            assert not any(tuple(ids[i:i + len(word)]) == tuple(word) for i in range(len(ids))), (word, ids)
        if "forced_eos_token_id" in settings and len(ids) == MAX_NEW:
            assert ids[-1] == settings["forced_eos_token_id"]
    if kind == "bart":
        assert {ids[0] for ids in outputs} == {settings["forced_bos_token_id"]}
        assert all(ids[1] not in settings["begin_suppress_tokens"] for ids in outputs)   # after the forced BOS
    if kind == "gpt2":
        assert all(t not in settings["suppress_tokens"] for ids in outputs for t in ids)
        assert all(ids[0] not in settings["begin_suppress_tokens"] for ids in outputs)
    if "min_length" in settings:   # min_length = start token / padded prompt + 4: EOS is wanted before that
        assert all(len(ids) >= 5 for ids in outputs)   # 4 tokens, then EOS at the earliest


@pytest.mark.parametrize("kind", ["bart", "gpt2"])
def test_min_length_keeps_eos_away_that_the_model_wants(configured, kind):
    gen, _, _ = configured[kind]
    shorter = _ours_without(gen, ["min_length"], GREEDY)
    assert any(len(ids) < 5 for per_prompt in shorter for ids in per_prompt)


@pytest.mark.parametrize("kind, options", [("bart", GREEDY), ("gpt2", GREEDY), ("gpt2", BEAM)])
def test_a_given_min_new_tokens_of_0_turns_the_models_min_length_off(configured, kind, options):
    """min_new_tokens=0 in the call kept the model's min_length (0 was taken as "not given"); transformers replaces
    min_length by prompt length + min_new_tokens whenever min_new_tokens is given, so 0 means no minimum."""
    gen, model, _ = configured[kind]
    expected, _ = generate_reference(model, gen.tokenizer, PROMPTS, MAX_NEW, {**options, "min_new_tokens": 0})
    ours = [[s.token_ids for s in r.sequences] for r in gen.generate(PROMPTS, max_new_tokens=MAX_NEW, min_new_tokens=0,
                                                                     **options)]
    assert ours == expected == _ours_without(gen, ["min_length"], options)
    if options is GREEDY:
        assert any(len(ids) < 5 for per_prompt in ours for ids in per_prompt)   # EOS before the model's min_length


def test_torch_backend_no_longer_warns_about_applied_settings(configured, caplog):
    from deploylm.backends.torch_backend import TorchBackend

    _, model, settings = configured["bart"]
    with caplog.at_level("WARNING", logger="deploylm"):
        backend = TorchBackend.from_source(model.name_or_path)
    assert not [r for r in caplog.records if r.name == "deploylm"]
    assert backend.info.generation["forced_bos_token_id"] == settings["forced_bos_token_id"] == 5
