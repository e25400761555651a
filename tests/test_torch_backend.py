"""The torch backend: prefill + decode equal a full forward, reorder gathers the right rows, the encoder
runs once per input, special tokens resolve as in transformers, and bad inputs are one clear error."""
from __future__ import annotations

import shutil

import pytest
import torch

from deploylm.backends.base import EncodedBatch
from deploylm.backends.torch_backend import TorchBackend
from deploylm.errors import UsageError
from deploylm.models.causal_lm import CausalTransformerLM
from deploylm.models.transformer import Seq2SeqTransformer

LOGITS_ATOL = 1e-4  # same math, different op order (cache vs full forward)
PROMPTS = ["the quick brown fox jumps", "hello", "one two three"]


@pytest.fixture(scope="module")
def sources(tiny_gpt2_dir, tiny_llama_dir, tiny_t5_dir, seed_seq2seq_dir, seed_lm_dir):
    return {"gpt2": tiny_gpt2_dir, "llama": tiny_llama_dir, "t5": tiny_t5_dir,
            "seed-seq2seq": seed_seq2seq_dir, "seed-lm": seed_lm_dir}


def full_logits(backend, batch: EncodedBatch, rows: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """Last-position logits [R, V] of one full forward (no cache) over prompt rows + generated tokens."""
    model, ids, mask = backend.model, batch.input_ids[rows], batch.attention_mask[rows]
    with torch.no_grad():
        if backend.info.is_encoder_decoder:
            start = torch.full((len(rows), 1), backend.info.special.decoder_start_token_id)
            tgt = torch.cat([start, generated], dim=1)
            if isinstance(model, Seq2SeqTransformer):
                return model(ids, mask, tgt)[:, -1].float()
            return model(input_ids=ids, attention_mask=mask, decoder_input_ids=tgt).logits[:, -1].float()
        full_ids = torch.cat([ids, generated], dim=1)
        full_mask = torch.cat([mask, torch.ones_like(generated)], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        if isinstance(model, CausalTransformerLM):
            return model(full_ids, full_mask, positions)[0][:, -1].float()
        return model(input_ids=full_ids, attention_mask=full_mask, position_ids=positions).logits[:, -1].float()


@pytest.mark.parametrize("kind", ["gpt2", "llama", "t5", "seed-seq2seq", "seed-lm"])
def test_prefill_decode_reorder_equal_full_forward(sources, kind):
    from deploylm.generator import load

    gen = load(sources[kind])
    backend, batch = gen.backend, gen.encode(PROMPTS)
    logits, state = backend.prefill(batch)
    assert logits.shape == (3, backend.info.vocab_size) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, full_logits(backend, batch, torch.arange(3), torch.zeros(3, 0, dtype=torch.long)),
                               atol=LOGITS_ATOL, rtol=0)
    # beams swap and duplicate within an input
    decode_through_reorders(backend, batch, state, [None, torch.tensor([1, 0, 3, 3, 4, 5]),
                                                    torch.tensor([0, 0, 2, 3, 5, 4])])


def decode_through_reorders(backend, batch, state, reorders):
    """Expand `state` to 2 rows per input of PROMPTS, then per step apply the reorder (None: none), decode one
    token per row, and check the logits against a full forward of each row's own history."""
    rows = torch.tensor([0, 0, 1, 1, 2, 2])
    state = backend.reorder(state, rows)
    history = torch.zeros(6, 0, dtype=torch.long)
    for step, parents in enumerate(reorders):
        if parents is not None:
            state = backend.reorder(state, parents)
            rows, history = rows[parents], history[parents]
        tokens = torch.tensor([5, 7, 9, 11, 13, 15]) + step
        logits, state = backend.decode(tokens, state)
        history = torch.cat([history, tokens[:, None]], dim=1)
        torch.testing.assert_close(logits, full_logits(backend, batch, rows, history), atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["t5", "seed-seq2seq"])
def test_encoder_runs_once_per_input_and_memory_stays_per_input(sources, kind):
    from deploylm.generator import load

    gen = load(sources[kind])
    model = gen.backend.model
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else None
    calls: list[int] = []
    if encoder is not None:
        encoder.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]),
                                      with_kwargs=True)
    else:
        original = model.encode
        model.encode = lambda ids, mask, *a: (calls.append(ids.shape[0]), original(ids, mask, *a))[1]
    results = gen.generate(PROMPTS, num_beams=4, max_new_tokens=5)
    assert len(results) == 3
    assert calls == [3]                                         # one encoder pass, one row per input
    assert gen.backend.encoder_calls == 3
    if kind == "seed-seq2seq":                                  # cross K/V never expanded per beam
        _, state = gen.backend.prefill(gen.encode(PROMPTS))
        state = gen.backend.reorder(state, torch.arange(3).repeat_interleave(4))
        _, state = gen.backend.decode(torch.full((12,), 5), state)
        state = gen.backend.reorder(state, torch.tensor([1, 1, 0, 2, 4, 5, 6, 7, 11, 8, 9, 9]))
        assert state.cross[0][0].shape[0] == 3 and state.self_past[0][0].shape[0] == 12


def test_seed_seq2seq_reorder_across_inputs_falls_back_to_per_row_memory(sources):
    from deploylm.generator import load

    gen = load(sources["seed-seq2seq"])
    backend, batch = gen.backend, gen.encode(PROMPTS)
    _, state = backend.prefill(batch)
    rows = torch.tensor([2, 0, 0, 1])                           # not "beams of one input contiguous"
    state = backend.reorder(state, rows)
    logits, state = backend.decode(torch.tensor([4, 5, 6, 7]), state)
    assert state.cross[0][0].shape[0] == 4
    torch.testing.assert_close(logits, full_logits(backend, batch, rows, torch.tensor([[4], [5], [6], [7]])),
                               atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["t5", "seed-seq2seq"])
def test_seq2seq_reorder_that_moves_rows_across_inputs_keeps_each_rows_encoder_memory(sources, kind):
    """reorder is a gather on the batch axis (base.py): with the row count unchanged, rows that take the
    place of another input's rows read their own input's encoder memory / cross K/V, and so do the rows
    of a further reorder after that (the per-row memory layout of the fallback)."""
    from deploylm.generator import load

    gen = load(sources[kind])
    backend, batch = gen.backend, gen.encode(PROMPTS)
    _, state = backend.prefill(batch)
    # rows rotate across inputs, divisible counts
    decode_through_reorders(backend, batch, state, [None, torch.tensor([4, 5, 0, 1, 2, 3]),
                                                    torch.tensor([1, 0, 3, 2, 5, 4]), torch.tensor([2, 2, 4, 4, 0, 0])])


@pytest.mark.parametrize("kind", ["gpt2", "llama", "seed-lm"])
def test_causal_reorder_that_moves_rows_across_prompts_keeps_each_rows_history(sources, kind):
    """reorder is a gather on the batch axis (base.py) for decoder-only models too: rows that take the place of
    another prompt's rows (prompts of other lengths: another mask and next position) decode as their own
    history does in a full forward."""
    from deploylm.generator import load

    gen = load(sources[kind])
    backend, batch = gen.backend, gen.encode(PROMPTS)
    _, state = backend.prefill(batch)
    decode_through_reorders(backend, batch, state, [None, torch.tensor([4, 5, 0, 1, 2, 3]),
                                                    torch.tensor([1, 0, 3, 2, 5, 4]), torch.tensor([2, 2, 4, 4, 0, 0])])


def test_identity_reorder_keeps_state_and_stats_count_calls(sources):
    from deploylm.generator import load

    gen = load(sources["llama"])
    backend, batch = gen.backend, gen.encode(PROMPTS)
    _, state = backend.prefill(batch)
    assert backend.reorder(state, torch.arange(3)) is state
    assert backend.stats.calls == 2 and backend.stats.seconds > 0


def test_unpadded_batch_uses_no_mask_like_transformers(sources):
    from deploylm.generator import load

    gen = load(sources["gpt2"])
    _, state = gen.backend.prefill(gen.encode(["hello world", "hello world"]))
    assert state.attention_mask is None
    _, state = gen.backend.prefill(gen.encode(["hello", "the quick brown fox"]))
    assert state.attention_mask is not None


def test_special_tokens_follow_generation_config_then_config(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from deploylm.models.hf import special_tokens

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.generation_config.eos_token_id = [1, 7]
    model.generation_config.pad_token_id = None
    model.config.pad_token_id = None
    special = special_tokens(model)
    assert special.eos_token_ids == (1, 7) and special.pad_token_id == 1  # pad falls back to the first EOS
    model.generation_config.eos_token_id = None
    assert special_tokens(model).eos_token_ids == (model.config.eos_token_id,)


def test_every_special_token_comes_from_generation_config_then_config(tiny_llama_dir, tiny_t5_dir):
    """bos, pad, EOS (several) and the decoder start each: generation_config's value when it sets one, else
    config's; the decoder start then falls back to bos (the tiny configs: Llama bos 0, eos 1, pad 2; T5 start 0)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from deploylm.backends.base import SpecialTokens
    from deploylm.models.hf import special_tokens

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (0, 1, 2)
    gen = model.generation_config
    gen.bos_token_id, gen.pad_token_id, gen.eos_token_id = 5, 6, [7, 8]
    assert special_tokens(model) == SpecialTokens(eos_token_ids=(7, 8), pad_token_id=6, bos_token_id=5)
    gen.bos_token_id = gen.pad_token_id = gen.eos_token_id = None
    assert special_tokens(model) == SpecialTokens(eos_token_ids=(1,), pad_token_id=2, bos_token_id=0)

    t5 = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir)
    assert t5.config.decoder_start_token_id == 0 and getattr(t5.config, "bos_token_id", None) is None
    t5.generation_config.decoder_start_token_id = 5
    assert special_tokens(t5).decoder_start_token_id == 5
    t5.generation_config.decoder_start_token_id = None
    assert special_tokens(t5).decoder_start_token_id == 0
    t5.config.decoder_start_token_id, t5.generation_config.bos_token_id = None, 9
    assert special_tokens(t5).decoder_start_token_id == 9 == special_tokens(t5).bos_token_id


def test_a_checkpoints_special_tokens_follow_its_generation_config_then_its_config():
    """deploylm checkpoints (and their artifacts): each special token from generation_config.json when it sets
    it, else config.json; an eos list stays a list; only seq2seq has a decoder start token."""
    from deploylm.backends.base import SpecialTokens
    from deploylm.backends.torch_seq2seq import seed_special_tokens

    config = {"eos_token_id": 1, "pad_token_id": 0, "bos_token_id": 2, "decoder_start_token_id": 3, "arch": "seq2seq"}
    assert seed_special_tokens(config, {}) == SpecialTokens((1,), 0, 2, 3)
    gen = {"eos_token_id": [4, 5], "pad_token_id": 6, "bos_token_id": 7, "decoder_start_token_id": 8}
    assert seed_special_tokens(config, gen) == SpecialTokens((4, 5), 6, 7, 8)
    assert seed_special_tokens({**config, "arch": "decoder"}, {"eos_token_id": 9}) == SpecialTokens((9,), 0, 2, None)


def test_t5_decoder_start_comes_from_config(sources):
    from deploylm.generator import load

    info = load(sources["t5"]).info
    assert info.is_encoder_decoder and info.special.decoder_start_token_id == 0  # T5: pad id


@pytest.mark.parametrize("kind", ["llama", "seed-lm", "seed-seq2seq"])
def test_bfloat16_weights_still_give_fp32_logits(sources, kind):
    """dtype applies to every kind of SRC the torch backend opens, deploylm checkpoints included."""
    backend = TorchBackend.from_source(str(sources[kind]), dtype="bfloat16")
    assert {p.dtype for p in backend.model.parameters()} == {torch.bfloat16}
    from deploylm.generator import load

    logits, _ = backend.prefill(load(sources[kind]).encode(PROMPTS))
    assert logits.dtype == torch.float32


def test_generation_defaults_come_from_generation_config(tiny_llama_dir, tmp_path):
    import json

    folder = tmp_path / "llama"
    shutil.copytree(tiny_llama_dir, folder)
    gen_file = folder / "generation_config.json"
    gen_file.write_text(json.dumps({**json.loads(gen_file.read_text()), "num_beams": 2, "max_new_tokens": 3}))
    backend = TorchBackend.from_source(str(folder))
    assert backend.generation_defaults == {"num_beams": 2, "max_new_tokens": 3}


@pytest.mark.parametrize("value,message", [("float64", "dtype 'float64'"),
                                           ("int4", "expected one of float32, float16, bfloat16, int8"),
                                           (torch.int8, "dtype torch.int8: expected one of float32, float16, bfloat16"),
                                           (torch.float64, "dtype torch.float64: expected one of float32")])
def test_bad_dtype_is_a_usage_error(tiny_gpt2_dir, value, message):
    with pytest.raises(UsageError, match=message):
        TorchBackend.from_source(str(tiny_gpt2_dir), dtype=value)


def test_cuda_unavailable_is_a_usage_error(tiny_gpt2_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="CUDA is not available"):
        TorchBackend.from_source(str(tiny_gpt2_dir), device="cuda")


def test_artifact_with_torch_backend_says_use_onnx(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(UsageError, match=r'use the onnx \(or trt\) backend: --backend onnx, or backend="onnx"'):
        TorchBackend.from_source(str(tmp_path))


def test_generation_settings_deploylm_does_not_apply_are_named(tiny_t5_dir, tmp_path, caplog):
    import json

    folder = tmp_path / "t5"
    shutil.copytree(tiny_t5_dir, folder)
    gen_file = folder / "generation_config.json"
    gen_file.write_text(json.dumps({**json.loads(gen_file.read_text()), "forced_bos_token_id": 0,
                                    "bad_words_ids": [[0]], "min_length": 0, "sequence_bias": [[[0], -1.0]],
                                    "encoder_no_repeat_ngram_size": 2, "do_sample": True}))
    with caplog.at_level("WARNING", logger="deploylm"):
        TorchBackend.from_source(str(folder))
    [record] = [r for r in caplog.records if r.name == "deploylm"]
    assert "sets do_sample, which deploylm does not apply" in record.getMessage()
    for applied in ("forced_bos_token_id", "bad_words_ids", "min_length", "sequence_bias",
                    "encoder_no_repeat_ngram_size"):  # the decoder applies these
        assert applied not in record.getMessage()



def test_generation_config_values_that_mean_off_are_not_named(caplog):
    """do_sample false, max_length 20, min_p 0, typical_p 1 (transformers' defaults) change nothing: no warning;
    each set to something else is named."""
    from deploylm.models.hf import decoding_defaults, generation_settings

    off = {"do_sample": False, "max_length": 20, "min_p": 0.0, "typical_p": 1.0, "min_length": 0,
           "encoder_repetition_penalty": 1.0, "num_beam_groups": 1, "bad_words_ids": [], "num_beams": 3}
    with caplog.at_level("WARNING", logger="deploylm"):
        assert decoding_defaults(off, "m") == {"num_beams": 3}
    assert not caplog.records and generation_settings(off) == {}
    with caplog.at_level("WARNING", logger="deploylm"):
        decoding_defaults({"do_sample": True, "max_length": 50, "min_p": 0.1}, "m")
    [record] = caplog.records
    assert "do_sample, min_p, max_length=50" in record.getMessage()
    assert generation_settings({"min_length": 2, "bad_words_ids": [[1, 2]], "sequence_bias": {(3,): -1.0}}) == {
        "min_length": 2, "bad_words_ids": ((1, 2),), "sequence_bias": (((3,), -1.0),)}


@pytest.mark.parametrize("config, types", [
    ({"rope_parameters": {"rope_type": "longrope"}}, {"longrope"}),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, {"dynamic"}),             # the older key and field
    ({"rope_parameters": {"full_attention": {"rope_type": "default"},                 # per layer type
                          "sliding_attention": {"rope_type": "linear"}}}, {"default", "linear"}),
    ({"text_config": {"rope_scaling": {"rope_type": "yarn"}}}, {"yarn"}),             # a multimodal model's
    ({"rope_scaling": None}, set()),
])
def test_rope_types_read_every_form_of_config_json(config, types):
    from deploylm.models.hf import rope_depends_on_length, rope_types

    assert rope_types(config) == types
    assert rope_depends_on_length(config) == bool(types & {"longrope", "dynamic"})

@pytest.mark.parametrize("fixture", ["seed_seq2seq_dir", "seed_lm_dir"])
def test_a_checkpoints_generation_config_settings_apply_on_the_torch_backend(fixture, tmp_path, request):
    """A deploylm checkpoint's generation_config.json settings (forced_bos_token_id, bad_words_ids, ...) are
    the decoder's processors on the torch backend, as on the onnx backend of its artifact (which read them
    while the checkpoint ignored them, so export's parity failed on identical_beams)."""
    import json

    import deploylm

    folder = shutil.copytree(request.getfixturevalue(fixture), tmp_path / "ck")
    gen_file = folder / "generation_config.json"
    gen_file.write_text(json.dumps({**json.loads(gen_file.read_text()), "forced_bos_token_id": 7,
                                    "bad_words_ids": [[9]]}))
    gen = deploylm.load(folder, backend="torch")
    assert gen.info.generation == {"forced_bos_token_id": 7, "bad_words_ids": ((9,),)}
    for seq in gen.generate(["hello world", "the quick brown fox"], num_beams=2, max_new_tokens=6)[0].sequences:
        assert 9 not in seq.token_ids
        assert seq.token_ids[0] == 7 or not gen.info.is_encoder_decoder   # decoder-only: forced after a 1-token prompt


def test_a_generation_config_max_length_is_named_as_not_applied(tiny_t5_dir, tmp_path, caplog):
    """transformers.generate stops a call without max_new_tokens at the generation_config's max_length
    (Marian, mBART and BART checkpoints set it); deploylm's limit is max_new_tokens, so it says so, unless
    max_new_tokens is set too (transformers then ignores max_length) or an artifact's profile gives it."""
    import json

    from deploylm.models.hf import decoding_defaults

    folder = tmp_path / "t5"
    shutil.copytree(tiny_t5_dir, folder)
    gen_file = folder / "generation_config.json"
    gen_file.write_text(json.dumps({**json.loads(gen_file.read_text()), "max_length": 40}))
    with caplog.at_level("WARNING", logger="deploylm"):
        TorchBackend.from_source(str(folder))
    [record] = [r for r in caplog.records if r.name == "deploylm"]
    assert "sets max_length=40 (deploylm stops at max_new_tokens, default 64), which deploylm does not apply" \
        in record.getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="deploylm"):
        assert decoding_defaults({"max_length": 40, "max_new_tokens": 20}, "m") == {"max_new_tokens": 20}
        decoding_defaults({"max_length": 40}, "m", given={"max_new_tokens": 64})
    assert not [r for r in caplog.records if r.name == "deploylm"]


def test_the_models_sampling_settings_apply_when_a_call_samples(tiny_llama_dir, tmp_path, caplog):
    """A generation_config's temperature, top_k and top_p are a sampling call's defaults, as in
    transformers.generate: the same seeded draws as `model.generate(do_sample=True)`; a call's own
    value still wins, and greedy calls are untouched."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import deploylm

    folder = tmp_path / "llama"
    shutil.copytree(tiny_llama_dir, folder)
    gen_file = folder / "generation_config.json"
    gen_file.write_text(json.dumps({**json.loads(gen_file.read_text()), "temperature": 0.3, "top_k": 3, "top_p": 0.7}))
    model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    enc = tok(["hello world"], return_tensors="pt")
    torch.manual_seed(3)
    theirs = model.generate(**enc, do_sample=True, max_new_tokens=8, num_return_sequences=3)[:, enc.input_ids.shape[1]:]
    with caplog.at_level("WARNING", logger="deploylm"):
        gen = deploylm.load(folder, backend="torch")
    assert not [r for r in caplog.records if r.name == "deploylm"]       # applied: nothing to warn about
    assert (gen.defaults.temperature, gen.defaults.top_k, gen.defaults.top_p) == (0.3, 3, 0.7)
    ours = gen.generate("hello world", do_sample=True, seed=3, num_beams=1, max_new_tokens=8, num_return_sequences=3)
    assert sorted(list(s.token_ids) for s in ours[0].sequences) == sorted(theirs.tolist())   # ours: best first
    hot = gen.generate("hello world", do_sample=True, seed=3, num_beams=1, max_new_tokens=8, temperature=1.0,
                       top_k=0, top_p=1.0, num_return_sequences=3)
    assert sorted(list(s.token_ids) for s in hot[0].sequences) != sorted(theirs.tolist())


def test_sampling_settings_not_applied_are_named(tiny_llama_dir, tmp_path, caplog):
    import json

    folder = tmp_path / "llama"
    shutil.copytree(tiny_llama_dir, folder)
    gen_file = folder / "generation_config.json"
    gen_file.write_text(json.dumps({**json.loads(gen_file.read_text()), "temperature": 0.0, "top_p": 0.9,
                                    "min_p": 0.05, "typical_p": 1.0}))
    with caplog.at_level("WARNING", logger="deploylm"):
        backend = TorchBackend.from_source(str(folder))
    [record] = [r for r in caplog.records if r.name == "deploylm"]
    assert "sets min_p, temperature=0.0 (out of range), which deploylm does not apply" in record.getMessage()
    assert "typical_p" not in record.getMessage()                        # 1.0 is transformers' "off"
    assert backend.generation_defaults == {"top_p": 0.9}


def test_generation_settings_transformers_applies_and_deploylm_does_not_are_named(caplog):
    """transformers.generate applies them from a generation_config (renormalize_logits: a log-softmax after the
    processors, other beam scores and, with a repetition penalty, other beams; guidance_scale: classifier-free
    guidance; top_h: a sampling filter; a watermark; stop strings) or refuses them without trust_remote_code
    (penalty_alpha, dola_layers); deploylm does not apply them, so the load warns, as for min_p. guidance_scale
    1.0 and penalty_alpha 0.0 are transformers' "off"."""
    from deploylm.models.hf import decoding_defaults

    with caplog.at_level("WARNING", logger="deploylm"):
        decoding_defaults({"renormalize_logits": True, "guidance_scale": 3.0, "top_h": 0.4, "stop_strings": ["."],
                           "watermarking_config": {"bias": 2.0}, "penalty_alpha": 0.6, "dola_layers": "high"}, "m")
    [record] = caplog.records
    assert ("sets top_h, renormalize_logits, guidance_scale, watermarking_config, stop_strings, penalty_alpha, "
            "dola_layers, which deploylm does not apply") in record.getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="deploylm"):
        decoding_defaults({"renormalize_logits": False, "guidance_scale": 1.0, "top_h": None, "stop_strings": None,
                           "penalty_alpha": 0.0, "dola_layers": None, "watermarking_config": None}, "m")
    assert not caplog.records


def test_a_model_default_out_of_range_is_named_and_a_call_can_give_its_own(tiny_llama_dir, tmp_path, caplog):
    # transformers takes a length_penalty of 20; deploylm's range is +-10: the model still loads, the value is
    # named in the warning (not applied), and a call's own value is used (it used to fail every load)
    import json

    import deploylm

    folder = tmp_path / "llama"
    shutil.copytree(tiny_llama_dir, folder)
    gen_file = folder / "generation_config.json"
    gen_file.write_text(json.dumps({**json.loads(gen_file.read_text()), "length_penalty": 20.0, "num_beams": 2,
                                    "repetition_penalty": 0.0}))
    with caplog.at_level("WARNING", logger="deploylm"):
        gen = deploylm.load(folder, backend="torch")
    [record] = [r for r in caplog.records if r.name == "deploylm"]
    assert "sets length_penalty=20.0 (out of range), repetition_penalty=0.0 (out of range), which deploylm does " \
           "not apply" in record.getMessage()
    assert (gen.defaults.num_beams, gen.defaults.length_penalty, gen.defaults.repetition_penalty) == (2, 1.0, 1.0)
    assert gen.generate("hello", length_penalty=2.0, max_new_tokens=2)[0].sequences
