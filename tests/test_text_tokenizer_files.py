"""Tokenizer files: a folder whose tokenizer is only a SentencePiece model, without the sentencepiece package."""
from __future__ import annotations

import importlib.util
import json

import pytest

from deploylm.errors import MissingDependencyError
from deploylm.models.source import resolve_source
from deploylm.models.tokenizer import load_tokenizer

CONFIGS = {
    "marian": {"model_type": "marian", "vocab_size": 8, "d_model": 8, "encoder_layers": 1, "decoder_layers": 1,
               "encoder_attention_heads": 1, "decoder_attention_heads": 1, "decoder_start_token_id": 0,
               "pad_token_id": 0},
    "t5": {"model_type": "t5", "vocab_size": 8, "d_model": 8, "num_layers": 1, "num_heads": 1, "d_kv": 8, "d_ff": 8},
}
FILES = {"marian": ["source.spm", "target.spm"], "t5": ["spiece.model"]}


@pytest.mark.skipif(importlib.util.find_spec("sentencepiece") is not None, reason="sentencepiece is installed")
@pytest.mark.parametrize("kind", ["marian", "t5"])
def test_a_sentencepiece_only_tokenizer_without_the_package_says_to_install_it(tmp_path, kind):
    """A Hugging Face Marian folder (opus-mt: source.spm, target.spm, vocab.json, no tokenizer.json) raised
    transformers' multi-line ImportError as a traceback; a T5 folder with only spiece.model was refused as
    needing `tiktoken` (transformers' fallback reader), which would not help. Both need sentencepiece."""
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS[kind]))
    for name in FILES[kind]:
        (tmp_path / name).write_bytes(b"\n\x05piece" * 8)
    if kind == "marian":
        (tmp_path / "vocab.json").write_text(json.dumps({"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3}))
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "MarianTokenizer"}))
    with pytest.raises(MissingDependencyError, match=rf"tokenizer of '{tmp_path}' is a SentencePiece model "
                       rf"\({FILES[kind][0]}, no tokenizer.json\): reading it needs the sentencepiece package: "
                       r"pip install sentencepiece$"):
        load_tokenizer(resolve_source(tmp_path))
