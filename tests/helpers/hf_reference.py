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


def per_prompt(rows: list[list[int]], eos: Any, n: int) -> list[list[tuple[int, ...]]]:
    """Generated rows cut after their first EOS (as `deploylm bench` cuts them), n consecutive rows per prompt."""
    from deploylm.benchmarking.measure import cut_at_eos

    cut = cut_at_eos(rows, eos)
    return [cut[i * n:(i + 1) * n] for i in range(len(cut) // n)]


def generate_reference(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                       options: dict) -> tuple[list[list[tuple[int, ...]]], Any]:
    """transformers.generate (not sampling, scores kept) on `prompts` padded as it expects: per prompt its
    num_return_sequences generated token tuples (EOS kept), and generate's own output."""
    enc_dec = model.config.is_encoder_decoder
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="right" if enc_dec else "left")
    out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, output_scores=True,
                         return_dict_in_generate=True, **options)
    generated = out.sequences[:, 1 if enc_dec else enc.input_ids.shape[1]:].tolist()
    return per_prompt(generated, {model.generation_config.eos_token_id},
                      options.get("num_return_sequences", 1)), out
