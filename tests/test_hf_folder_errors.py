"""Hugging Face folders and GGUF files that cannot run: one UsageError naming the input and what is
wrong, never a model with random weights, nor a traceback from inside transformers or safetensors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import deploylm
from deploylm.errors import UsageError
from tests.helpers.tiny_hf import build_tiny_hf


@pytest.fixture
def llama(tiny_llama_dir, tmp_path):
    """A private copy of the tiny Llama folder, to break."""
    return shutil.copytree(tiny_llama_dir, tmp_path / "llama")


def _rewrite_weights(folder, edit):
    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def test_a_folder_missing_weights_is_refused_not_filled_with_random_values(llama):
    _rewrite_weights(llama, lambda w: [w.pop(k) for k in [k for k in w if k.startswith("model.layers.1.")]])
    with pytest.raises(UsageError, match=r"does not hold the weights of LlamaForCausalLM: \d+ weight\(s\) missing "
                                         r"\(model\.layers\.1\."):
        deploylm.load(llama)


def test_a_config_with_more_layers_than_the_weights_is_refused(llama):
    config = json.loads((llama / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (llama / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match=r"weight\(s\) missing \(model\.layers\.\d+\."):
        deploylm.load(llama)


def test_a_weight_of_the_wrong_shape_is_named(llama):
    _rewrite_weights(llama, lambda w: w.update({"model.norm.weight": torch.ones(w["model.norm.weight"].shape[0] + 1)}))
    with pytest.raises(UsageError, match=r"1 of another shape \(model\.norm\.weight\)"):
        deploylm.load(llama)


def test_a_model_without_a_language_model_head_is_refused(tmp_path, tiny_llama_dir):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / name, folder / name)
    with pytest.raises(UsageError, match=r"does not hold the weights of BertLMHeadModel: .*missing \(cls\.predictions"):
        deploylm.load(folder)


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "config.json").write_text("[1, 2]"), r"config\.json: expected a JSON object of model settings, got list"),
    (lambda f: (f / "generation_config.json").write_text("[1]"),
     r"generation_config\.json: expected a JSON object of generation settings, got list"),
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000]),
     r"does not load as a Hugging Face causal or seq2seq LM: .*model\.safetensors is damaged or truncated \(Error while "
     "deserializing header"),
    (lambda f: (f / "model.safetensors").write_bytes(bytes(range(256)) * 64),
     r"does not load as a Hugging Face causal or seq2seq LM: .*model\.safetensors is damaged or truncated \(Error while "
     "deserializing header"),
    (lambda f: (f / "config.json").write_text(json.dumps({**json.loads((f / "config.json").read_text()),
                                                          "num_attention_heads": 3, "num_key_value_heads": 3})),
     r"does not load as a Hugging Face causal or seq2seq LM: .*hidden size \(32\) is not a multiple of the number "
     r"of attention heads \(3\)"),
])
def test_damaged_files_give_one_clear_error(llama, damage, message):
    damage(llama)
    with pytest.raises(UsageError, match=message):
        deploylm.load(llama)


@pytest.mark.parametrize("key, value, expected", [
    ("vocab_size", "300", r"Field 'vocab_size' expected int, got str \(value: '300'\)"),
    ("num_hidden_layers", 2.0, r"Field 'num_hidden_layers' expected int, got float"),
    ("eos_token_id", "</s>", r"Field 'eos_token_id'"),
])
def test_a_config_value_of_the_wrong_type_names_the_file_and_the_field(llama, key, value, expected):
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(UsageError, match=r"config\.json: a setting has the wrong type: .*" + expected) as err:
        deploylm.load(llama)
    assert "\n" not in str(err.value)
    line = _one_line_error(["generate", "--model", str(llama), "hello"])
    assert "config.json: a setting has the wrong type" in line


@pytest.mark.parametrize("text, expected", [
    ("{", r"generation_config\.json: not valid JSON .*expected the model's generation settings as a JSON object"),
    ('{"eos_token_id": "</s>"}', r"generation_config\.json: eos_token_id is \"</s>\": expected a token id"),
    ('{"eos_token_id": [1, "x"]}', r"generation_config\.json: eos_token_id is \[1, \"x\"\]: expected a token id"),
    ('{"num_beams": "4"}', r"generation_config\.json: num_beams is \"4\": expected an integer"),
    ('{"early_stopping": "yes"}', r"generation_config\.json: early_stopping is \"yes\": expected true, false or"),
])
def test_a_damaged_generation_config_is_named_not_ignored(llama, text, expected):
    """transformers silently replaces an unreadable generation_config.json with defaults from config.json."""
    (llama / "generation_config.json").write_text(text)
    with pytest.raises(UsageError, match=expected):
        deploylm.load(llama)
    line = _one_line_error(["generate", "--model", str(llama), "--num-beams", "1", "hello"])
    assert "generation_config.json: " in line


def test_an_unreadable_weight_file_is_named_not_called_missing(llama, monkeypatch):
    """transformers says "No such file or directory" for a weight file it may not read (chmod 000)."""
    import os

    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path).name != "model.safetensors" and real(path, mode, **kw))
    with pytest.raises(UsageError, match=r"model\.safetensors: cannot read it \(permission denied\)"):
        deploylm.load(llama)


@pytest.mark.parametrize("key, value, expected", [
    ("num_attention_heads", 0, "a positive integer"),          # was a ZeroDivisionError inside transformers
    ("vocab_size", 0, "a positive integer"),                   # an AssertionError from torch's Embedding
    ("max_position_embeddings", -1, "a positive integer"),     # "a window of -1: lower max_new_tokens to at most -1"
    ("num_hidden_layers", -1, r"an integer >= 0"),             # loaded, then a ValueError in transformers' cache
])
def test_a_config_size_out_of_range_names_the_file_and_the_key(llama, key, value, expected):
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(UsageError, match=rf"config\.json: {key} is {value}: expected {expected}"):
        deploylm.load(llama).generate("hello", max_new_tokens=2, num_beams=1)


@pytest.mark.parametrize("damage, expected", [
    (lambda f: (f / "tokenizer.json").unlink(), r"the folder has no tokenizer\.json \(Couldn't instantiate the backend "
                                               r"tokenizer from one of: \(1\) a `tokenizers` library serialization file"),
    (lambda f: (f / "tokenizer.json").write_text((f / "tokenizer.json").read_text()[:1000]),
     r"tokenizer\.json is not valid JSON \(Unterminated string"),
    (lambda f: (f / "tokenizer_config.json").write_text("{"), r"tokenizer_config\.json is not valid JSON"),
])
def test_a_damaged_tokenizer_names_the_file(llama, damage, expected):
    """transformers' own messages name no file, and the first line of one ends in 'from one of:'."""
    damage(llama)
    with pytest.raises(UsageError, match=r"tokenizer of '.*llama' does not load: " + expected):
        deploylm.load(llama)


def _shard(folder):
    """The tiny Llama saved as 4 safetensors shards plus model.safetensors.index.json."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    model.save_pretrained(folder, max_shard_size="50KB")
    return sorted(folder.glob("model-*.safetensors"))


@pytest.mark.parametrize("damage, expected", [
    (lambda f: (f / "model.safetensors.index.json").write_text("{"), r"model\.safetensors\.index\.json is damaged or truncated"),
    (lambda f: _cut(_shard_of(f, 2), 2000), r"model-00003-of-00004\.safetensors is damaged or truncated \(Error while "
                                             r"deserializing header"),
])
def test_a_damaged_file_of_a_sharded_folder_is_named(llama, damage, expected):
    _shard(llama)
    damage(llama)
    with pytest.raises(UsageError, match=r"does not load as a Hugging Face causal or seq2seq LM: .*" + expected):
        deploylm.load(llama)


def test_a_truncated_pytorch_model_bin_is_named(llama):
    """transformers said only '[Errno 22] Invalid argument'."""
    weights = load_file(llama / "model.safetensors")
    (llama / "model.safetensors").unlink()
    torch.save(weights, llama / "pytorch_model.bin")
    _cut(llama / "pytorch_model.bin", 5000)
    with pytest.raises(UsageError, match=r"pytorch_model\.bin is truncated or damaged"):
        deploylm.load(llama)


def _shard_of(folder, index):
    return sorted(folder.glob("model-*.safetensors"))[index]


def _cut(path, size):
    path.write_bytes(path.read_bytes()[:size])


@pytest.mark.parametrize("key, value", [("num_beams", 0), ("no_repeat_ngram_size", -1)])
def test_a_default_decoding_option_out_of_range_is_named_with_its_file(llama, key, value, caplog):
    """Not the caller's option: a generation_config.json value out of range is named in the load warning and
    not applied (the model loads, a call gives its own); a default that reaches the Generator invalid (an
    artifact manifest's 'generation') is refused naming where it comes from."""
    from deploylm.generator import Generator

    gen = json.loads((llama / "generation_config.json").read_text())
    (llama / "generation_config.json").write_text(json.dumps({**gen, key: value}))
    with caplog.at_level("WARNING", logger="deploylm"):
        loaded = deploylm.load(llama)
    assert f"sets {key}={value} (out of range)" in caplog.text
    assert getattr(loaded.defaults, key) != value
    with pytest.raises(UsageError, match=rf"^a/manifest\.json \('generation'\): the model's default decoding option "
                                         rf"{key}={value} is invalid"):
        Generator(loaded.backend, loaded.tokenizer, defaults={key: value}, defaults_from="a/manifest.json ('generation')")


@pytest.mark.parametrize("key, value, expected", [
    ("vocab_size", "300", r"config\.json: a setting has the wrong type: .*Field 'vocab_size' expected int"),
    ("num_attention_heads", 0, r"config\.json: num_attention_heads is 0: expected a positive integer"),
])
def test_distill_from_a_teacher_with_a_damaged_config_is_one_line(llama, tmp_path, key, value, expected):
    """distill reads the teacher's tokenizer and config before its model: AutoTokenizer and AutoConfig raised
    huggingface_hub's validation error or a ZeroDivisionError there."""
    import re

    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**config, key: value}))
    data = tmp_path / "data.txt"
    data.write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    line = _one_line_error(["distill", "--teacher", str(llama), "--data", str(data), "--out", str(tmp_path / "student"),
                            "--steps", "1"])
    assert re.search(expected, line), line
    assert not (tmp_path / "student").exists()


def test_a_tokenizer_from_another_model_is_refused_at_the_prompt(tmp_path):
    folder = build_tiny_hf("llama", tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text())
    small = 40                                    # the tokenizer has 300 ids: most words are past 40
    _rewrite_weights(folder, lambda w: w.update({k: v[:small].clone() for k, v in w.items()
                                                 if v.shape[0] == config["vocab_size"]}))
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": small}))
    gen = deploylm.load(folder)
    with pytest.raises(UsageError, match=r"prompt 1 has token id \d+ \(.*\), outside the model's vocabulary of 40 ids"):
        gen.generate("the quick brown fox jumps over the lazy dog", max_new_tokens=2)


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_a_damaged_gguf_file_gives_one_clear_error(smollm2_gguf, tmp_path, damage):
    data = smollm2_gguf.open("rb").read(100 if damage == "truncated" else 6000)
    if damage == "header":
        data = data[:5000] + b"\xff" * 100 + data[5100:]
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    with pytest.raises(UsageError, match=r"GGUF file '.*model\.gguf' does not load with transformers \(damaged"):
        deploylm.load(path)



def test_a_gguf_file_loads_and_matches_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers.tiny_gguf import write_tiny_llama_gguf

    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name)
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ids = tok("the quick brown fox", return_tensors="pt")
    expected = model.generate(**ids, max_new_tokens=4, do_sample=False)[0, ids.input_ids.shape[1]:].tolist()
    result = deploylm.load(path).generate("the quick brown fox", max_new_tokens=4, num_beams=1)
    assert list(result[0].sequences[0].token_ids) == expected


def test_a_gguf_file_missing_tensors_is_refused_not_filled_with_random_values(tmp_path):
    from tests.helpers.tiny_gguf import write_tiny_llama_gguf

    path = write_tiny_llama_gguf(tmp_path / "cut.gguf", drop_tensors=("blk.1.ffn_down.weight",))
    with pytest.raises(UsageError, match=r"GGUF file '.*cut\.gguf' does not hold the weights of LlamaForCausalLM: "
                                         r"1 weight\(s\) missing \(model\.layers\.1\.mlp\.down_proj\.weight\)"):
        deploylm.load(path)


@pytest.mark.parametrize("part", [0, 1])
def test_a_part_of_a_split_gguf_model_is_named_so_not_called_short_of_weights(tmp_path, part):
    """llama.cpp's gguf-split writes big models as model-00001-of-00003.gguf, ...: the first part holds the metadata
    and some tensors, the others only tensors; transformers loads single files only. The first part read "does not
    hold the weights of LlamaForCausalLM: 2 weight(s) missing ... (check the sizes and vocabulary in the file's
    metadata against its tensors)", a later one (no general.architecture) "damaged or not a GGUF model file?"."""
    from tests.helpers.tiny_gguf import write_tiny_llama_gguf

    path = write_tiny_llama_gguf(tmp_path / f"tiny-0000{part + 1}-of-00003.gguf", split=(part, 3), tokenizer=not part,
                                 drop_tensors=("blk.1.ffn_down.weight", "blk.1.ffn_up.weight"))
    if part:    # a later part holds no model metadata: no general.architecture
        data = path.read_bytes()
        path.write_bytes(data.replace(b"general.architecture", b"general.architectur_", 1))
    with pytest.raises(UsageError, match=rf"^GGUF file '.*tiny-0000{part + 1}-of-00003\.gguf' is part {part + 1} of 3 "
                                         r"of a split model \(split\.count 3\): transformers loads one whole file; "
                                         r"merge the parts first \(llama\.cpp: llama-gguf-split --merge "
                                         r".*tiny-00001-of-00003\.gguf merged\.gguf\)$"):
        deploylm.load(path)


def test_a_gguf_file_without_a_tokenizer_says_so_not_that_its_shapes_differ(tmp_path):
    """No tokenizer.ggml.* metadata (and no vocab_size): transformers took Llama's default vocabulary and the error
    was a shape mismatch of the embedding; docs/models.md promises a refusal of metadata without a tokenizer."""
    from tests.helpers.tiny_gguf import write_tiny_llama_gguf

    path = write_tiny_llama_gguf(tmp_path / "notok.gguf", tokenizer=False)
    with pytest.raises(UsageError, match=r"GGUF file '.*notok\.gguf' holds no tokenizer in its metadata \(no "
                                         r"tokenizer\.ggml\.tokens\)") as info:
        deploylm.load(path)
    assert "shape" not in str(info.value)


def test_a_gguf_file_without_a_tokenizer_is_named_so_when_transformers_itself_raises(tmp_path, monkeypatch):
    """The other branch of the check: transformers raises while loading (here: a ValueError, as its GGUF reader
    does on metadata it cannot map) instead of loading with the wrong vocabulary. The missing tokenizer is still
    the error, not "damaged or not a GGUF model file"."""
    from transformers import AutoModelForCausalLM

    from tests.helpers.tiny_gguf import write_tiny_llama_gguf

    path = write_tiny_llama_gguf(tmp_path / "notok.gguf", tokenizer=False)

    def raising(*args, **kwargs):
        raise ValueError("vocab_size is not in the GGUF metadata")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", raising)
    with pytest.raises(UsageError, match=r"GGUF file '.*notok\.gguf' holds no tokenizer in its metadata") as info:
        deploylm.load(path)
    assert "damaged" not in str(info.value)


def test_a_gguf_file_with_a_tokenizer_that_transformers_cannot_load_is_called_damaged(tmp_path, monkeypatch):
    """The same branch with a tokenizer present: the check passes and the load error is reported, in one line."""
    from transformers import AutoModelForCausalLM

    from tests.helpers.tiny_gguf import write_tiny_llama_gguf

    path = write_tiny_llama_gguf(tmp_path / "tok.gguf")

    def raising(*args, **kwargs):
        raise ValueError("some tensor cannot be mapped\nsecond line")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", raising)
    with pytest.raises(UsageError, match=r"GGUF file '.*tok\.gguf' does not load with transformers \(damaged or "
                                         r"not a GGUF model file\?\): some tensor cannot be mapped$"):
        deploylm.load(path)


def test_a_gguf_file_of_an_unsupported_architecture_names_the_supported_ones(tmp_path):
    from tests.helpers.tiny_gguf import write_tiny_llama_gguf

    path = write_tiny_llama_gguf(tmp_path / "other.gguf", architecture="rwkv7")
    with pytest.raises(UsageError, match=r"GGUF file '.*other\.gguf' is of architecture 'rwkv7', which transformers "
                                         r"does not load from GGUF: supported are .*llama.*qwen2") as info:
        deploylm.load(path)
    assert "damaged" not in str(info.value) and "general" not in str(info.value).split("supported are")[1]



def _set_tensor_type(path, index, type_id):
    """Rewrite the GGML type id of the file's index-th tensor in place."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).tensors[index].field   # parts: name length, name, n_dims, dims, type, offset
    offset = field.offset + sum(part.nbytes for part in field.parts[:4])
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(int(type_id).to_bytes(4, "little"))


@pytest.mark.parametrize("case, expected", [
    ("F64", r"holds tensors of type F64, which gguf \S+ cannot dequantize: the types it reads are F32, F16, Q4_0, "
            r".*Q8_0, .*Q4_K, .*BF16.* \(convert the model again to one of them\)$"),
    ("id 99", r"holds a tensor of type id 99, which gguf \S+ does not know \(a type newer than this gguf: pip "
              r"install -U gguf; or a damaged file\): the types it reads are F32, F16, .*Q4_K"),
])
def test_a_gguf_file_of_a_tensor_type_gguf_cannot_read_names_the_type_and_those_it_reads(tmp_path, case, expected):
    """Both read "does not load with transformers (damaged or not a GGUF model file?)" before, with gguf's own
    words after it: a valid file of a type the installed gguf cannot unpack was called damaged."""
    from tests.helpers.tiny_gguf import write_tiny_llama_gguf

    path = write_tiny_llama_gguf(tmp_path / "typed.gguf", tensor_type="F64" if case == "F64" else "F32")
    if case == "id 99":
        _set_tensor_type(path, 1, 99)
    with pytest.raises(UsageError, match=r"^GGUF file '.*typed\.gguf' " + expected) as info:
        deploylm.load(path)
    assert "\n" not in str(info.value) and "damaged or not a GGUF" not in str(info.value)


def test_a_gguf_file_whose_special_token_id_is_outside_its_tokens_gives_one_clear_error(tmp_path):
    from tests.helpers.tiny_gguf import write_tiny_llama_gguf

    path = write_tiny_llama_gguf(tmp_path / "eos.gguf", eos_token_id=5000)
    with pytest.raises(UsageError, match=r"tokenizer of '.*eos\.gguf' does not load: .*special token id .*outside"):
        deploylm.load(path)


def _save(model_cls, config, dest):
    from tests.helpers.tiny_hf import train_tokenizer

    torch.manual_seed(0)
    model_cls(config).eval().save_pretrained(dest)
    train_tokenizer("llama").save_pretrained(dest)
    return dest


def _one_line_error(args):
    from click.testing import CliRunner

    from deploylm.cli import cli

    result = CliRunner().invoke(cli, args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def _causal(**extra):
    from tests.helpers.tiny_hf import train_tokenizer

    tok = train_tokenizer("llama")
    return dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, **extra)


@pytest.mark.parametrize("name, build, reason", [
    ("mixtral", lambda: ("MixtralForCausalLM", "MixtralConfig", _causal(num_local_experts=4, num_experts_per_tok=2)),
     "mixture-of-experts"),
    ("dynamic-rope", lambda: ("LlamaForCausalLM", "LlamaConfig", _causal(
        rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})), "dynamic NTK"),
    ("falcon-alibi", lambda: ("FalconForCausalLM", "FalconConfig", dict(
        vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True, multi_query=True)),
     "alibi"),
    ("mamba", lambda: ("MambaForCausalLM", "MambaConfig", dict(vocab_size=300, hidden_size=32, num_hidden_layers=2,
                                                               state_size=4)), "state-space"),
])
def test_architectures_the_exporter_cannot_build_are_refused_in_one_line(name, build, reason, tmp_path):
    """The torch backend runs them; export says in one line why it cannot, before any tracing."""
    import transformers

    model_name, config_name, kwargs = build()
    folder = _save(getattr(transformers, model_name), getattr(transformers, config_name)(**kwargs), tmp_path / name)
    line = _one_line_error(["export", "--model", str(folder), "--profile", "fp32", "--out", str(tmp_path / "out")])
    assert "cannot export this" in line and reason in line and "--backend torch" in line
    assert not (tmp_path / "out").exists()
    assert deploylm.load(folder, backend="torch").generate("hello", max_new_tokens=2)[0].sequences


def test_a_state_space_cache_under_its_older_name_is_found():
    """Before transformers 5.24 Mamba's forward takes and returns its cache as `cache_params` (neither
    `cache` nor `past_key_values`): the torch backend passes and reads it under that name, and export
    refuses the model in one line instead of an AttributeError."""
    from types import SimpleNamespace

    from deploylm.export.hf_graphs import causal_cache
    from deploylm.models.hf import cache_keyword, cache_of

    class OldMamba(torch.nn.Module):
        config = SimpleNamespace(model_type="mamba")

        def forward(self, input_ids=None, cache_params=None, use_cache=None, **kwargs):
            raise AssertionError("not called")

    state = SimpleNamespace(conv_states=[], ssm_states=[])
    out = SimpleNamespace(logits=None, cache_params=state)
    assert cache_keyword(OldMamba()) == "cache_params"
    assert cache_of(out) is state
    with pytest.raises(UsageError, match="cannot export this mamba model to ONNX: .*state-space"):
        causal_cache(OldMamba(), out)


    class NewOutput:   # transformers 5.24: the old names are properties that log a deprecation warning
        cache = state

        @property
        def past_key_values(self):
            raise AssertionError("read the deprecated name")

        cache_params = past_key_values

    assert cache_of(NewOutput()) is state


@pytest.mark.parametrize("config", [
    lambda t: t.Qwen2MoeConfig(num_experts=4),                            # Qwen2-MoE, OLMoE: num_experts
    lambda t: t.DeepseekV3Config(n_routed_experts=4),                      # DeepSeek V2/V3, GLM-4 MoE: n_routed_experts
    lambda t: t.Llama4Config(text_config={"num_local_experts": 4}),       # a multimodal model's text config
], ids=["num_experts", "n_routed_experts", "text_config"])
def test_every_mixture_of_experts_config_is_refused_for_export(config):
    """Mixtral's num_local_experts is not the only name: the other families' expert counts, and a multimodal
    model's nested text config, are refused too (a dense config, or one of a single expert, is not)."""
    from types import SimpleNamespace

    import transformers

    from deploylm.export.hf_graphs import check_exportable

    with pytest.raises(UsageError, match=r"cannot export this .* model to ONNX: a mixture-of-experts model"):
        check_exportable(SimpleNamespace(config=config(transformers)))
    check_exportable(SimpleNamespace(config=transformers.LlamaConfig()))
    check_exportable(SimpleNamespace(config=transformers.Qwen2MoeConfig(num_experts=1)))


def test_a_masked_lm_is_refused_as_no_decoder(tmp_path):
    """BertForMaskedLM's weights load as BertLMHeadModel, which then returns no cache: one line, not a
    traceback from inside the search or the exporter."""
    from transformers import BertConfig, BertForMaskedLM

    folder = _save(BertForMaskedLM, BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                               intermediate_size=64), tmp_path / "bert")
    for args in (["generate", "--model", str(folder), "hello"],
                 ["export", "--model", str(folder), "--profile", "fp32", "--out", str(tmp_path / "out")]):
        error = _one_line_error(args)
        assert f"model {str(folder)!r} (bert, BertLMHeadModel) returns no key/value cache: it is not a decoder" in error


def test_a_folder_that_needs_its_own_code_is_refused_without_asking(tmp_path, tiny_llama_dir, monkeypatch):
    """transformers would ask on the terminal whether to run the folder's Python code; deploylm never runs
    it and says so in one line (stdin is never read)."""
    import io

    folder = shutil.copytree(tiny_llama_dir, tmp_path / "custom")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="my-custom-lm", auto_map={"AutoConfig": "configuration_my.MyConfig",
                                                       "AutoModelForCausalLM": "modeling_my.MyModel"})
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))          # a "yes" that must not be read
    with pytest.raises(UsageError, match=r"needs its own Python code \(config.json \"auto_map\"\)"):
        deploylm.load(folder)
    assert __import__("sys").stdin.read() == "y\n"


class _Records(__import__("logging").Handler):
    """Collects what transformers' loading logger emits (its library logger does not propagate to pytest's)."""

    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def loading_log():
    """What transformers' loading logger emits, at transformers' default verbosity (warning): an earlier test
    may have left it at error (`bench --in-process` quiets transformers), where no LOAD REPORT is ever logged."""
    import logging

    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_warning()
    handler, logger = _Records(), logging.getLogger("transformers.modeling_utils")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)
    transformers_logging.set_verbosity(verbosity)


def test_a_missing_head_is_one_line_without_transformers_load_report(llama, loading_log):
    """transformers' multi-line LOAD REPORT table is not printed before deploylm's own error line."""
    _rewrite_weights(llama, lambda w: w.pop("lm_head.weight"))
    line = _one_line_error(["generate", "--model", str(llama), "hello"])
    assert "1 weight(s) missing (lm_head.weight)" in line
    assert not [m for m in loading_log if "LOAD REPORT" in m]


def test_unused_weights_are_one_warning_line(tiny_llama_dir, tmp_path, caplog, loading_log):
    folder = shutil.copytree(tiny_llama_dir, tmp_path / "extra")
    _rewrite_weights(folder, lambda w: w.update({"model.spare.weight": torch.zeros(3)}))
    with caplog.at_level("WARNING"):
        deploylm.load(folder)
    ours = [r.getMessage() for r in caplog.records if r.name == "deploylm"]
    assert any("1 weight(s) in its files are not used by LlamaForCausalLM (model.spare.weight)" in m for m in ours)
    assert not [m for m in loading_log if "LOAD REPORT" in m]


def test_many_missing_weights_name_three_and_count_the_rest():
    """The one line names the first three (sorted) weights and counts the others; mismatched weights come as
    transformers' (name, file shape, model shape) tuples and are named by their name alone."""
    from deploylm.models.hf import check_loaded_weights

    loading = {"missing_keys": {"w.e", "w.a", "w.d", "w.c", "w.b"}, "unexpected_keys": [],
               "mismatched_keys": [("w.x", (3,), (4,))]}
    with pytest.raises(UsageError) as info:
        check_loaded_weights("model folder 'm'", "LlamaForCausalLM", loading)
    assert ("model folder 'm' does not hold the weights of LlamaForCausalLM: 5 weight(s) missing "
            "(w.a, w.b, w.c, ... 2 more); 1 of another shape (w.x); ") in str(info.value)
    loading["missing_keys"] = {"w.c", "w.b", "w.a"}          # exactly three: no "... 0 more"
    with pytest.raises(UsageError, match=r"3 weight\(s\) missing \(w\.a, w\.b, w\.c\); 1 of"):
        check_loaded_weights("model folder 'm'", "LlamaForCausalLM", loading)
    check_loaded_weights("model folder 'm'", "LlamaForCausalLM", {"missing_keys": [], "mismatched_keys": []})


def test_a_quantized_gguf_loads_unpacked_without_asking_the_hub_for_a_kernel(tmp_path, monkeypatch, capfd):
    """transformers >= 5.2x keeps quantized GGUF weights packed for some architectures when it finds a
    matmul kernel, which it fetches from the hub (with the `kernels` package installed), and for every
    file loaded in fp16/bf16 it warns that "its weights packed" are fastest in float32 — about weights
    it then unpacks anyway. deploylm asks for them unpacked at load: no kernel is looked up, no such
    warning, and every layer is a plain Linear in the dtype asked for."""
    quantizer = pytest.importorskip("transformers.quantizers.quantizer_gguf")
    if not hasattr(quantizer, "get_gguf_kernel"):
        pytest.skip("this transformers never packs GGUF weights")
    from deploylm.models.hf import load_hf_model
    from deploylm.models.source import resolve_source
    from tests.helpers.tiny_gguf import write_tiny_llama_gguf

    looked_up = []
    monkeypatch.setattr(quantizer, "get_gguf_kernel", lambda: looked_up.append(True) or False)
    path = write_tiny_llama_gguf(tmp_path / "tiny-Q8_0.gguf", tensor_type="Q8_0")
    capfd.readouterr()
    model = load_hf_model(resolve_source(path), dtype=torch.float16, device=torch.device("cpu"))
    assert "packed" not in capfd.readouterr().err
    assert looked_up == []
    linears = [m for m in model.modules() if "Linear" in type(m).__name__]
    assert linears and {type(m) for m in linears} == {torch.nn.Linear}
    assert {m.weight.dtype for m in linears} == {torch.float16}


def test_a_gguf_file_is_loaded_with_its_weights_asked_for_unpacked(tmp_path, monkeypatch):
    """The test above loads a Llama file, which transformers 5.24 never packs (its packing loader takes
    qwen35/lfm2 only): here the load itself must ask for dequantize=True wherever GgufConfig has it, so
    that a packing architecture gets plain layers and no kernel download too."""
    import inspect

    import transformers

    if "dequantize" not in inspect.signature(getattr(transformers, "GgufConfig", lambda: None)).parameters:
        pytest.skip("this transformers has no GgufConfig(dequantize=...)")
    from deploylm.models.hf import load_hf_model
    from deploylm.models.source import resolve_source
    from tests.helpers.tiny_gguf import write_tiny_llama_gguf

    asked = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def from_pretrained(*args, **kwargs):
        asked.append(kwargs.get("quantization_config"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    path = write_tiny_llama_gguf(tmp_path / "tiny-Q8_0.gguf", tensor_type="Q8_0")
    load_hf_model(resolve_source(path), dtype=torch.float32, device=torch.device("cpu"))
    assert len(asked) == 1 and isinstance(asked[0], transformers.GgufConfig) and asked[0].dequantize is True, asked


@pytest.mark.parametrize("tensor_type", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_weights_load_as_the_files_tensors_dequantized_in_hugging_face_layout(tmp_path, tensor_type):
    """Every weight of a loaded .gguf file is gguf's own dequantization of the file's tensor, with the
    q/k rows that llama.cpp's converter permuted put back in Hugging Face order; F32 gives back the
    Hugging Face model the file was written from, bit for bit."""
    import gguf

    from deploylm.models.hf import load_hf_model
    from deploylm.models.source import resolve_source
    from tests.helpers.tiny_gguf import _permute, tiny_llama_model, write_tiny_llama_gguf

    path = write_tiny_llama_gguf(tmp_path / f"tiny-{tensor_type}.gguf", tensor_type=tensor_type)
    _, original = tiny_llama_model()
    loaded = load_hf_model(resolve_source(path), dtype=torch.float32, device=torch.device("cpu")).state_dict()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    reader = gguf.GGUFReader(path)
    in_file = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    assert {t.tensor_type.name for t in reader.tensors} == {"F32", tensor_type}
    assert len(in_file) == len(original.state_dict()) == len(loaded)
    for hf_name, want in original.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        got = loaded[hf_name].numpy()
        as_stored = _permute(got, 4 if "attn_q" in name else 2) if name.endswith(("attn_q.weight", "attn_k.weight")) else got
        np.testing.assert_array_equal(as_stored, in_file[name].reshape(got.shape).astype(np.float32), err_msg=hf_name)
        if tensor_type == "F32":
            np.testing.assert_array_equal(got, want.numpy(), err_msg=hf_name)
        else:    # a 4-bit grid of 16 steps over each block of 32 values: within a step of the original
            step = float((want.max() - want.min()) / (15 if "Q4" in tensor_type else 255))
            assert float(np.abs(got - want.numpy()).max()) <= step, hf_name


def test_a_generation_config_with_several_eos_ids_loads_with_all_of_them(llama):
    """Llama 3 and others list several end tokens: eos_token_id as a list of ids is valid, not damage."""
    gen = json.loads((llama / "generation_config.json").read_text())
    (llama / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [2, 1]}))
    assert deploylm.load(llama).backend.info.special.eos_token_ids == (2, 1)
