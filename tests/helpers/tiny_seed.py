"""Tiny random deploylm checkpoints (encoder-decoder or decoder-only) with a BPE tokenizer, in seconds.

The tokenizer is trained on the `reverse` task's words, so task batches and short prompts tokenize
sensibly; the folders load with load_checkpoint, AutoTokenizer and deploylm.load.
"""
from __future__ import annotations

from pathlib import Path

import torch

from deploylm.models.checkpoint import build_model, save_checkpoint
from deploylm.models.config import make_config
from deploylm.training.tasks import REVERSE_WORDS
from deploylm.training.tokenizer import save_tokenizer, train_tokenizer, write_side_files

TEXTS = [" ".join(REVERSE_WORDS[i:] + REVERSE_WORDS[:i]) for i in range(len(REVERSE_WORDS))]


def build_tiny_seed(dest: Path, *, arch: str = "seq2seq", layers: int = 4, d_model: int = 32, seed: int = 0) -> Path:
    """Save a seeded random `arch` model with `layers` per stack to `dest` (a new folder)."""
    tok = train_tokenizer(TEXTS, vocab_size=300)
    config = make_config("tiny", tok.get_vocab_size(), arch=arch, d_model=d_model, n_heads=2, d_ff=2 * d_model,
                         n_encoder_layers=layers if arch == "seq2seq" else 0, n_decoder_layers=layers, max_positions=64)
    torch.manual_seed(seed)
    model = build_model(config).eval()
    save_checkpoint(dest, model, config, tok, generation={"max_new_tokens": 12})
    save_tokenizer(tok, dest, config.max_positions)
    return Path(dest)


def tiny_checkpoint(dest: Path, arch: str = "seq2seq") -> Path:
    """A tiny random deploylm checkpoint ("seq2seq" or "decoder", 4 heads) whose tokenizer is trained on the
    tiny Hugging Face models' corpus: the backend tests' seeded model (fixtures seed_seq2seq_dir, seed_lm_dir)."""
    from tests.helpers.tiny_hf import CORPUS

    tok = train_tokenizer(CORPUS, vocab_size=300, min_frequency=1)
    config = make_config("tiny", vocab_size=tok.get_vocab_size(), arch=arch, dropout=0.0, d_model=32,
                         n_heads=4, d_ff=64, max_positions=64)
    torch.manual_seed(0)
    save_checkpoint(dest, build_model(config), config, tokenizer=tok, overwrite=True)
    write_side_files(dest, config.max_positions)
    return dest
