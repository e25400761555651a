"""Tokenizers for every SRC kind, loaded with transformers' AutoTokenizer as a user of transformers would.

Artifacts opened by `deploylm.load` use a LightTokenizer when their tokenizer is a plain `tokenizers`
file that transformers would use unchanged: the same ids and text without importing transformers
(an onnx-only process does not need it; issue 7)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deploylm.errors import MissingDependencyError, UsageError
from deploylm.models.source import Source

# Any one of these makes a folder's tokenizer loadable by AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "tokenizer.model",
                   "sentencepiece.bpe.model", "source.spm", "vocab.txt")
# SentencePiece model files: without a tokenizer.json beside them, transformers reads them with `sentencepiece`
# (not tokenizer.model: Llama 2's is one, Llama 3's is a tiktoken file).
SENTENCEPIECE_FILES = ("spiece.model", "sentencepiece.bpe.model", "source.spm")


def load_tokenizer(source: Source, light: bool = False) -> Any:
    """The transformers tokenizer of `source` (checkpoint, Hugging Face or artifact folder, or .gguf file).

    light=True: for a folder whose tokenizer is a plain `tokenizers` file that transformers would use as
    it is (see `light_tokenizer`), a LightTokenizer (same ids and text, without importing transformers);
    otherwise the transformers tokenizer.
    """
    if light and source.kind != "gguf":
        found = light_tokenizer(source.path)
        if found is not None:
            return found
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
    if source.kind == "hf":          # AutoTokenizer reads config.json too: its damage named as load_hf_model names it
        from deploylm.models.hf import check_config_sizes

        check_config_sizes(path)
    try:
        return auto.from_pretrained(path, trust_remote_code=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - sorted below; anything else is re-raised
        from deploylm.models.hf import _config_type_error, _first_line, _is_config_type_error

        if source.kind != "gguf":
            _check_sentencepiece(source.path, exc)
        if _is_config_type_error(exc):
            raise _config_type_error(source, exc) from None
        if isinstance(exc, IndexError) and source.kind == "gguf":
            raise UsageError(f"tokenizer of {str(source.path)!r} does not load: a special token id in its metadata "
                             "(tokenizer.ggml.bos/eos/unknown/padding_token_id) is outside its token list "
                             "(tokenizer.ggml.tokens)") from None
        if not isinstance(exc, (ValueError, KeyError, OSError, TypeError)):
            raise
        reason = _first_line(exc).strip()
        if reason.endswith(":"):          # "Couldn't instantiate the backend tokenizer from one of:" + a list
            reason = " ".join(str(exc).split())
        if source.kind != "gguf":         # name the file when it is one of the folder's own that is at fault
            broken = next((name for name in _JSON_FILES if not _reads_as_json(path / name)), None)
            if broken is not None:
                reason = f"{broken} is not valid JSON ({reason})"
            elif not (path / "tokenizer.json").is_file():
                reason = f"the folder has no tokenizer.json ({reason})"
        raise UsageError(f"tokenizer of {str(source.path)!r} does not load: {reason}") from None


_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json")


def _check_sentencepiece(folder: Path, exc: Exception) -> None:
    """A folder whose tokenizer is only a SentencePiece model (Marian's source.spm, many T5 fine-tunes'
    spiece.model) needs the `sentencepiece` package, which deploylm does not install: without it transformers
    raises an ImportError (Marian) or, having fallen back to its tiktoken reader, asks for `tiktoken` (T5),
    which would not help. Either is a MissingDependencyError saying what to install."""
    import importlib.util

    model_file = next((name for name in SENTENCEPIECE_FILES if (folder / name).is_file()), None)
    if model_file is None or (folder / "tokenizer.json").is_file() or importlib.util.find_spec("sentencepiece"):
        return
    if isinstance(exc, ImportError) or any(name in str(exc).lower() for name in ("sentencepiece", "tiktoken")):
        raise MissingDependencyError(f"tokenizer of {str(folder)!r} is a SentencePiece model ({model_file}, no "
                                     "tokenizer.json): reading it needs the sentencepiece package: "
                                     "pip install sentencepiece") from None


def pad_like_the_model(tokenizer: Any, special: Any) -> None:
    """A tokenizer without a pad token (GPT-2's, most Llama and Mistral ones) pads with the model's pad id
    (`special.pad_token_id`; transformers: its first EOS), as every batch of padded prompts needs. A tokenizer
    object without the attribute (a test's stand-in) is left alone."""
    if getattr(tokenizer, "pad_token_id", 0) is None:
        tokenizer.pad_token_id = special.pad_token_id


def _reads_as_json(file: Path) -> bool:
    """False for a file that exists and is not JSON (True when it is JSON or absent)."""
    try:
        json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False
    return True


def _is_deploylm_folder(path: Path) -> bool:
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type", "")
    except (OSError, ValueError, AttributeError):
        return False
    return str(model_type).startswith("deploylm")


# tokenizer_config.json keys a LightTokenizer understands (anything else: the transformers tokenizer).
_LIGHT_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
_LIGHT_KEYS = {"backend", "tokenizer_class", "bos_token", "eos_token", "pad_token", "unk_token", "is_local",
               "local_files_only", "model_max_length", "clean_up_tokenization_spaces", "chat_template",
               "name_or_path"}
_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def light_tokenizer(folder: Path) -> "LightTokenizer | None":
    """A LightTokenizer for `folder`, or None when transformers would do more than use its tokenizer.json
    as it is: another tokenizer class, extra settings (add_bos_token, added tokens, ...), truncation or
    padding stored in tokenizer.json, or a named special token that is not a special added token."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    if (not isinstance(config, dict) or config.get("tokenizer_class") not in _LIGHT_CLASSES
            or set(config) - _LIGHT_KEYS or config.get("backend", "tokenizers") != "tokenizers"
            or config.get("clean_up_tokenization_spaces", False) is not False
            or not (folder / "tokenizer.json").is_file()):
        return None
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception:  # noqa: BLE001 - let transformers report it
        return None
    if backend.truncation is not None or backend.padding is not None or backend.post_processor is None:
        return None
    special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    names = {}
    for key in _SPECIAL_KEYS:
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if value is not None and (not isinstance(value, str) or value not in special):
            return None
        names[key] = value
    return LightTokenizer(folder, backend, names)


class LightTokenizer:
    """The subset of a transformers fast tokenizer that `Generator` uses, straight on `tokenizers`.

    For folders `light_tokenizer` accepts, transformers' TokenizersBackend calls the same Rust tokenizer
    (encode_batch with the file's post-processor, decode with skip_special_tokens, no clean-up), so ids,
    masks and text are the same (tests/test_light_loading.py checks SmolLM2's). It spares importing transformers
    and its tokenizer's Python-side tables: −72 MiB RSS in an onnx process (issue 7). Calls it does not
    cover (truncation, windows, anything else) go to the transformers tokenizer, loaded on first use.
    """

    clean_up_tokenization_spaces = False   # light_tokenizer refuses folders that clean up

    def __init__(self, folder: Path, backend: Any, special: dict[str, str | None]) -> None:
        self.name_or_path = str(folder)
        self.backend_tokenizer = backend
        self.padding_side = "right"
        for key, token in special.items():
            setattr(self, key, token)
        self.pad_token_id = None if self.pad_token is None else backend.token_to_id(self.pad_token)
        self.eos_token_id = None if self.eos_token is None else backend.token_to_id(self.eos_token)
        self.bos_token_id = None if self.bos_token is None else backend.token_to_id(self.bos_token)
        self._full: Any = None

    def __call__(self, text: str | list[str], *, return_tensors: str | None = None, padding: bool = False,
                 padding_side: str | None = None, verbose: bool = True, **kwargs: Any) -> dict[str, Any]:
        if kwargs or padding not in (False, True) or return_tensors not in (None, "pt"):
            return self.full(text, return_tensors=return_tensors, padding=padding, padding_side=padding_side,
                             verbose=verbose, **kwargs)
        texts = [text] if isinstance(text, str) else list(text)
        ids = [e.ids for e in self.backend_tokenizer.encode_batch(texts, add_special_tokens=True)]
        masks = [[1] * len(row) for row in ids]
        if padding and len(ids) > 1:
            if self.pad_token_id is None:
                raise ValueError("Asking to pad but the tokenizer does not have a padding token.")
            width, left = max(map(len, ids)), (padding_side or self.padding_side) == "left"
            pads = [width - len(row) for row in ids]
            ids = [[self.pad_token_id] * n + row if left else row + [self.pad_token_id] * n for row, n in zip(ids, pads)]
            masks = [[0] * n + row if left else row + [0] * n for row, n in zip(masks, pads)]
        if return_tensors == "pt":
            import torch

            return {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(masks, dtype=torch.long)}
        if isinstance(text, str):
            return {"input_ids": ids[0], "attention_mask": masks[0]}
        return {"input_ids": ids, "attention_mask": masks}

    def encode(self, text: str) -> list[int]:
        return self(text)["input_ids"]

    def decode(self, token_ids: Any, skip_special_tokens: bool = False) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else [int(t) for t in token_ids]
        return self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in sequences]

    @property
    def full(self) -> Any:
        """The transformers tokenizer of the same folder (imports transformers), with the same pad id."""
        if self._full is None:
            from deploylm.models.source import Source

            self._full = load_tokenizer(Source("artifact", Path(self.name_or_path)))
        if self.pad_token_id is not None and self._full.pad_token_id != self.pad_token_id:
            self._full.pad_token_id = self.pad_token_id
        return self._full

    @property
    def truncation_side(self) -> str:
        return self.full.truncation_side

    @truncation_side.setter
    def truncation_side(self, side: str) -> None:
        self.full.truncation_side = side

    def __getattr__(self, name: str) -> Any:    # anything not covered here: the transformers tokenizer's
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.full, name)
