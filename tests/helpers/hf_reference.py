"""What the decoder tests compare against: transformers models and logits processors."""
from __future__ import annotations

from typing import Any

import torch


def load_hf(path: Any) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer padded as transformers.generate expects: right for encoder-decoders,
    left for decoder-only models)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    enc_dec = AutoConfig.from_pretrained(path).is_encoder_decoder
    model = (AutoModelForSeq2SeqLM if enc_dec else AutoModelForCausalLM).from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "right" if enc_dec else "left"
    return model, tokenizer


def hf_processors() -> Any:
    """transformers.generation.logits_process (imported when a test needs it)."""
    from transformers.generation import logits_process

    return logits_process


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical fp32 tensors of the same shape."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))
