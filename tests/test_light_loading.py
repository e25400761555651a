"""An onnx-only process does not need transformers (issue 7: its import and tokenizer tables are ~70 MiB
of the onnx row's peak RSS): artifacts' tokenizers load as LightTokenizer (same ids and text as the
transformers tokenizer), special tokens come from config files, and the bench's onnx worker never
imports transformers."""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from deploylm.benchmarking.workload import STANDARD_PROMPTS
from deploylm.models.hf import special_tokens_from_files
from deploylm.models.source import Source, resolve_source
from deploylm.models.tokenizer import LightTokenizer, light_tokenizer, load_tokenizer

TEXTS = [*STANDARD_PROMPTS, "<|im_start|>user\nHi<|im_end|>", "  two leading spaces", "émoji 🙂 and 中文", "a",
         "the quick brown fox", "</s> <s> <pad> inline specials"]


def _same_as_transformers(folder: Path) -> None:
    from deploylm.models.source import Source

    light, full = light_tokenizer(folder), load_tokenizer(Source("hf", folder))
    assert isinstance(light, LightTokenizer)
    assert (light.pad_token_id, light.eos_token_id, light.bos_token_id) == (full.pad_token_id, full.eos_token_id,
                                                                           full.bos_token_id)
    for side in ("left", "right"):
        a = light(TEXTS, return_tensors="pt", padding=True, padding_side=side, verbose=False)
        b = full(TEXTS, return_tensors="pt", padding=True, padding_side=side, verbose=False)
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    a, b = light(TEXTS, return_tensors="pt", padding=True), full(TEXTS, return_tensors="pt", padding=True)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    for text in TEXTS:
        assert light(text, verbose=False)["input_ids"] == full(text, verbose=False)["input_ids"] == light.encode(text)
    rng, vocab = random.Random(0), light.backend_tokenizer.get_vocab_size()
    for n in range(200):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))] + [0, 1, 2][: n % 4]
        for skip in (True, False):
            assert light.decode(ids, skip_special_tokens=skip) == full.decode(ids, skip_special_tokens=skip), ids
        assert light.decode(ids) == full.decode(ids), ids                    # the defaults: specials kept
    rows = [[rng.randrange(vocab) for _ in range(5)] + [0, 1, 2] for _ in range(3)]
    for skip in (True, False):
        assert light.batch_decode(rows, skip_special_tokens=skip) == full.batch_decode(rows, skip_special_tokens=skip)


@pytest.mark.slow
def test_light_tokenizer_matches_transformers_on_smollm2(smollm2_gguf, tmp_path):
    load_tokenizer(resolve_source(smollm2_gguf)).save_pretrained(tmp_path)   # what an export writes
    _same_as_transformers(tmp_path)


def test_light_tokenizer_matches_transformers_on_tiny_llama(tiny_llama_dir):
    _same_as_transformers(tiny_llama_dir)


def test_light_tokenizer_refuses_what_transformers_would_change(tiny_llama_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_llama_dir / name).read_bytes())
    assert light_tokenizer(tmp_path) is not None
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for change in ({"add_bos_token": True}, {"tokenizer_class": "LlamaTokenizer"}, {"pad_token": "not-a-token"},
                   {"clean_up_tokenization_spaces": True}, {"backend": "sentencepiece"}, {"eos_token": ["</s>"]}):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, **change}))
        assert light_tokenizer(tmp_path) is None, change
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "pad_token"}))
    light, full = light_tokenizer(tmp_path), load_tokenizer(Source("hf", tmp_path))
    assert light.pad_token_id is None is full.pad_token_id
    for tok in (light, full):   # no pad token: padding texts of different lengths is transformers' ValueError
        with pytest.raises(ValueError, match="Asking to pad but the tokenizer does not have a padding token"):
            tok(["a", "the quick brown fox"], padding=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    from tokenizers import Tokenizer

    for stored in ("padding", "truncation"):   # settings in tokenizer.json itself
        backend = Tokenizer.from_file(str(tiny_llama_dir / "tokenizer.json"))
        backend.enable_padding() if stored == "padding" else backend.enable_truncation(8)
        backend.save(str(tmp_path / "tokenizer.json"))
        assert light_tokenizer(tmp_path) is None, stored


def test_light_tokenizer_hands_the_rest_to_transformers(tiny_llama_dir):
    """Truncation (and anything else it does not implement) goes to the transformers tokenizer."""
    light, full = light_tokenizer(tiny_llama_dir), load_tokenizer(resolve_source(tiny_llama_dir))
    assert light.full is not full                                  # its own transformers tokenizer
    light.truncation_side = full.truncation_side = "left"
    a = light(TEXTS[:3], return_tensors="pt", padding=True, padding_side="left", truncation=True, max_length=5)
    b = full(TEXTS[:3], return_tensors="pt", padding=True, padding_side="left", truncation=True, max_length=5)
    assert torch.equal(a["input_ids"], b["input_ids"]) and a["input_ids"].shape[1] == 5
    assert light.num_special_tokens_to_add() == full.num_special_tokens_to_add()


def test_special_tokens_from_files_match_transformers(tiny_llama_dir, tiny_gpt2_dir, tiny_t5_dir):
    from deploylm.backends.onnx_backend import _hf_special

    assert special_tokens_from_files(tiny_llama_dir) == _hf_special(tiny_llama_dir)
    gen = json.loads((tiny_llama_dir / "generation_config.json").read_text())
    assert special_tokens_from_files(tiny_llama_dir)[0].eos_token_ids == (gen["eos_token_id"],)
    assert special_tokens_from_files(tiny_gpt2_dir) is None      # n_positions: attribute_map, not plain
    assert special_tokens_from_files(tiny_t5_dir) is None        # encoder-decoder



@pytest.mark.parametrize("generation", [
    {"bos_token_id": 6, "eos_token_id": [1, 7], "pad_token_id": 5},   # several EOS ids, all three its own
    {"eos_token_id": 7},                                                # bos and pad: config's
    None,                                                               # no generation_config.json
])
def test_special_tokens_from_files_match_the_loaded_model(tiny_llama_dir, tmp_path, generation):
    """special_tokens_from_files (what an onnx-only process reads) against special_tokens of the model the
    torch backend loads from the same files (the comparison above goes through special_tokens_from_files
    on both sides for a Llama folder)."""
    from transformers import AutoModelForCausalLM

    from deploylm.models.hf import position_window, special_tokens

    folder = shutil.copytree(tiny_llama_dir, tmp_path / "llama")
    (folder / "generation_config.json").unlink()
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    model = AutoModelForCausalLM.from_pretrained(folder)
    found = special_tokens_from_files(folder)
    assert found == (special_tokens(model), False, position_window(model.config))
    if generation is not None:
        eos = generation["eos_token_id"]
        assert found[0].eos_token_ids == tuple(eos if isinstance(eos, list) else [eos])


@pytest.fixture(scope="module")
def llama_artifact(tiny_llama_dir, tmp_path_factory) -> Path:
    from deploylm.export.pipeline import export_model

    out = tmp_path_factory.mktemp("light") / "llama-fp32"
    export_model(tiny_llama_dir, "fp32", out)
    return out


WORKER = textwrap.dedent("""
    import sys
    from deploylm.benchmarking.worker import quiet_libraries_env
    quiet_libraries_env()
    if sys.argv[2] == "files":
        import deploylm.backends.onnx_backend as ob
        from deploylm.models.hf import special_tokens_from_files
        ob._hf_special = special_tokens_from_files
    from deploylm.benchmarking.measure import open_local_runner
    from deploylm.benchmarking.workload import BenchConfig, RowSpec, workload_of
    config = BenchConfig(models=(sys.argv[1],), prompts=("the quick brown fox", "hello world"), batch_size=2,
                         num_beams=2, max_new_tokens=4)
    runner = open_local_runner(RowSpec("row", sys.argv[1], "onnx", "fp32"), workload_of(config))
    result = runner.run()
    print(type(runner.generator.tokenizer).__name__, result.tokens, "transformers" in sys.modules)
""")


@pytest.mark.parametrize("special", [
    "files",
    "shipped",  # onnx_backend._hf_special reads the files first (issue 7 hook)
])
def test_onnx_bench_worker_does_not_import_transformers(llama_artifact, special):
    out = subprocess.run([sys.executable, "-c", WORKER, str(llama_artifact), special], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["LightTokenizer", "8", "False"]


def test_a_tokenizer_without_tokenizer_json_loads_by_its_class(tiny_gpt2_dir, tmp_path):
    """A Hugging Face folder whose tokenizer is GPT-2's vocab.json + merges.txt (no tokenizer.json) loads through
    AutoTokenizer by its tokenizer_class, with the same ids as the tokenizer.json it was written from."""
    folder = tmp_path / "slow"
    folder.mkdir()
    shutil.copy(tiny_gpt2_dir / "config.json", folder / "config.json")
    model = json.loads((tiny_gpt2_dir / "tokenizer.json").read_text())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"]))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in model["merges"]) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    slow, fast = load_tokenizer(Source("hf", folder)), load_tokenizer(Source("hf", tiny_gpt2_dir))
    for text in TEXTS:
        assert slow(text)["input_ids"] == fast(text)["input_ids"], text


def test_a_deploylm_checkpoints_tokenizer_loads_without_transformers_reading_its_model_type(seed_lm_dir):
    """AutoTokenizer would read config.json's model_type "deploylm-lm", which transformers does not know, and
    log "You are using a model of type `deploylm-lm` ..." on every load: a checkpoint's plain tokenizers file
    opens directly."""
    import logging

    messages = []

    class Records(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler, logger = Records(), logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        tokenizer = load_tokenizer(Source("checkpoint", seed_lm_dir))
    finally:
        logger.removeHandler(handler)
    assert tokenizer("12")["input_ids"] and not [m for m in messages if "deploylm-lm" in m], messages


def test_the_pad_id_given_to_a_light_tokenizer_reaches_its_transformers_tokenizer(tiny_llama_dir, tmp_path):
    """A tokenizer without a pad token pads with the model's pad id (pad_like_the_model); a call the light
    tokenizer hands to transformers (truncation) pads with that id too, not 'Asking to pad but ...'."""
    from types import SimpleNamespace

    from deploylm.models.tokenizer import pad_like_the_model

    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_llama_dir / name).read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "pad_token"}))
    light = light_tokenizer(tmp_path)
    assert light.pad_token_id is None
    pad_like_the_model(light, SimpleNamespace(pad_token_id=2))
    out = light(["a", "the quick brown fox"], return_tensors="pt", padding=True, truncation=True, max_length=4)
    assert out["input_ids"][0, -1].item() == 2 and out["attention_mask"][0].tolist()[-1] == 0
