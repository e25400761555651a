"""The training tokenizer: byte-level BPE trained with HF `tokenizers`, saved as HF tokenizer files.

Special tokens have fixed ids that match TransformerConfig: <pad>=0, <s>=1, </s>=2, <unk>=3.
Digits are pre-tokenized one by one (numbers are read digit by digit, which digits2words needs),
then byte-level BPE as in GPT-2, so any text round-trips exactly. Encoding a source appends </s>
(the post-processor, as T5 does); targets are encoded without special tokens and the trainer adds
<s>/</s> itself. The decoder-only LM's tokenizer (for_language_model) instead prepends <s> and adds
no </s>, as Llama's does, so a prompt tokenized by transformers starts like a training paragraph. The folder loads with `transformers.PreTrainedTokenizerFast.from_pretrained`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from deploylm.errors import UsageError

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)            # ids 0, 1, 2, 3 in this order
TOKENIZER_FILE = "tokenizer.json"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1000, min_frequency: int = 2) -> Tokenizer:
    """A BPE tokenizer learnt from `texts`; at most `vocab_size` tokens (the 256 byte symbols included)."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size, len(SPECIAL_TOKENS) + 256), min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False)
    tok.train_from_iterator(texts, trainer)
    for index, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == index, f"special token {token} must have id {index}"
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, 2)])
    return tok


def for_language_model(tok: Tokenizer) -> Tokenizer:
    """`tok` with a post-processor for decoder-only models: `<s>` before the text, no `</s>` after
    (a prompt must not end the text; the LM was trained on `<s> paragraph </s>` sequences)."""
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, 1)])
    return tok


def save_tokenizer(tok: Tokenizer, folder: Path, model_max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `folder`."""
    tok.save(str(Path(folder) / TOKENIZER_FILE))
    write_side_files(folder, model_max_length)


def write_side_files(folder: Path, model_max_length: int) -> None:
    """tokenizer_config.json and special_tokens_map.json (each replaced atomically), so that
    `AutoTokenizer.from_pretrained(folder)` knows the special tokens."""
    special = {"pad_token": PAD, "bos_token": BOS, "eos_token": EOS, "unk_token": UNK}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "padding_side": "right", "clean_up_tokenization_spaces": False, **special}
    _write_json(Path(folder) / "tokenizer_config.json", config)
    _write_json(Path(folder) / "special_tokens_map.json", special)


def _write_json(path: Path, data: dict) -> None:
    from deploylm.training.outdir import write_json

    write_json(path, data)


def load_tokenizer(folder: Path) -> Tokenizer:
    """The tokenizer saved in `folder` by save_tokenizer; a damaged file is a UsageError naming it."""
    path = Path(folder) / TOKENIZER_FILE
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:   # tokenizers raises its own plain Exception for a malformed file
        raise UsageError(f"{path}: not a readable tokenizer ({str(exc).splitlines()[0] if str(exc) else exc!r}); "
                         "restore it or start over with --force") from None


def encode_sources(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each source, ending with </s>."""
    return [enc.ids for enc in tok.encode_batch(texts, add_special_tokens=True)]


def encode_targets(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each target, without special tokens."""
    return [enc.ids for enc in tok.encode_batch(texts, add_special_tokens=False)]


def decode(tok: Tokenizer, ids: list[list[int]]) -> list[str]:
    """Text of each id list, special tokens dropped."""
    return tok.decode_batch(ids, skip_special_tokens=True)
