"""Tokenizers for every SRC kind, loaded with transformers' AutoTokenizer as a user of transformers would."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deploylm.errors import UsageError
from deploylm.models.source import Source

# Any one of these makes a folder's tokenizer loadable by AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "tokenizer.model",
                   "sentencepiece.bpe.model", "source.spm", "vocab.txt")


def load_tokenizer(source: Source) -> Any:
    """The transformers tokenizer of `source` (checkpoint, Hugging Face or artifact folder, or .gguf file)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = source.path
    if source.kind == "gguf":
        kwargs: dict[str, Any] = {"gguf_file": path.name}
        path = path.parent
    else:
        kwargs = {}
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise UsageError(f"model folder {str(source.path)!r} has no tokenizer: expected one of {', '.join(TOKENIZER_FILES[:3])}")
    # deploylm's own folders (config.json model_type "deploylm-*") hold a plain tokenizers file:
    # open it as PreTrainedTokenizerFast, without AutoTokenizer looking the model type up.
    auto = PreTrainedTokenizerFast if source.kind != "gguf" and _is_deploylm_folder(path) else AutoTokenizer
    try:
        return auto.from_pretrained(path, **kwargs)
    except (ValueError, KeyError, OSError, TypeError) as exc:
        lines = str(exc).strip().splitlines()
        raise UsageError(f"tokenizer of {str(source.path)!r} does not load: {lines[0] if lines else type(exc).__name__}") from None


def _is_deploylm_folder(path: Path) -> bool:
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type", "")
    except (OSError, ValueError, AttributeError):
        return False
    return str(model_type).startswith("deploylm")
