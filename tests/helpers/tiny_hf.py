"""Tiny random Hugging Face models (GPT-2, Llama, T5, BART, Marian) built from configs, saved as local folders.

Each folder has config.json, generation_config.json, model.safetensors and a tokenizer trained here
with `tokenizers` (byte-level BPE), so the folders load exactly like a downloaded model would.
The output layer is scaled up (`logit_scale`) so next-token distributions are peaked: no near-ties,
so search comparisons are not decided by float noise.
"""
from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a model that ships must say the same thing on every backend",
    "beam search keeps the best partial sentences at every step",
    "translate english to french: the house is wonderful",
    "summarize: deploylm exports models to onnx and checks them against pytorch",
    "one two three four five six seven eight nine ten eleven twelve",
    "hello world, this is a tiny language model for tests",
    "numbers like 4096 become four thousand ninety-six",
] * 4

SPECIALS = {"gpt2": ["<|endoftext|>"], "llama": ["<s>", "</s>", "<pad>"], "t5": ["<pad>", "</s>", "<unk>"]}
SPECIALS["bart"] = SPECIALS["marian"] = SPECIALS["t5"]   # pad 0, eos 1, unk 2
SEQ2SEQ = ("t5", "bart", "marian")


def train_tokenizer(kind: str, vocab_size: int = 300):
    """A byte-level BPE tokenizer wrapped as PreTrainedTokenizerFast with the kind's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS[kind],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if kind == "gpt2":
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                       eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    if kind == "llama":
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                       pad_token="<pad>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def _config(kind: str, tokenizer):
    from transformers import BartConfig, GPT2Config, LlamaConfig, MarianConfig, T5Config

    v = len(tokenizer)
    if kind in ("bart", "marian"):  # no generation settings of their own: tests set them explicitly
        sizes = dict(vocab_size=v, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                     forced_eos_token_id=None, tie_word_embeddings=False)
        if kind == "bart":
            return BartConfig(**sizes, bos_token_id=tokenizer.unk_token_id,
                              decoder_start_token_id=tokenizer.eos_token_id)
        return MarianConfig(**sizes, decoder_start_token_id=tokenizer.pad_token_id)
    if kind == "gpt2":
        return GPT2Config(vocab_size=v, n_positions=128, n_embd=32, n_layer=2, n_head=4,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    if kind == "llama":
        return LlamaConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return T5Config(vocab_size=v, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                    num_heads=4, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                    decoder_start_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)


def build_tiny_hf(kind: str, dest: Path, *, seed: int = 0, logit_scale: float = 8.0) -> Path:
    """Build, seed and save a tiny random `kind` model ("gpt2" | "llama" | "t5" | "bart" | "marian") to `dest`."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, GenerationConfig

    tokenizer = train_tokenizer(kind)
    config = _config(kind, tokenizer)
    torch.manual_seed(seed)
    auto = AutoModelForSeq2SeqLM if kind in SEQ2SEQ else AutoModelForCausalLM
    model = auto.from_config(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(logit_scale)
    model.generation_config = GenerationConfig.from_model_config(config)
    dest = Path(dest)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest
