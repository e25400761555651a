"""Hugging Face folders and GGUF files that cannot run: one UsageError naming the input and what is
wrong, never a model with random weights, nor a traceback from inside transformers or safetensors."""
from __future__ import annotations

import json
import shutil

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
    (lambda f: (f / "generation_config.json").write_text("[1]"), "does not load as a Hugging Face causal or seq2seq LM"),
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000]),
     "does not load as a Hugging Face causal or seq2seq LM: Error while deserializing header"),
    (lambda f: (f / "model.safetensors").write_bytes(bytes(range(256)) * 64),
     "does not load as a Hugging Face causal or seq2seq LM: Error while deserializing header"),
])
def test_damaged_files_give_one_clear_error(llama, damage, message):
    damage(llama)
    with pytest.raises(UsageError, match=message):
        deploylm.load(llama)


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
