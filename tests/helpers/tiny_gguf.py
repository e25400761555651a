"""A tiny random Llama written as a .gguf file (F32, byte-level BPE tokenizer in its metadata), the way
llama.cpp's converter writes one: llama.cpp's tensor names, q/k rows permuted, tokenizer.ggml.* keys.
"""
from __future__ import annotations

import json
from pathlib import Path


def _permute(w, n_head: int):
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_llama_model():
    """(tokenizer, the tiny random LlamaForCausalLM) that write_tiny_llama_gguf writes (seeded: the same
    weights on every call)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.helpers.tiny_hf import train_tokenizer

    tok = train_tokenizer("llama")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    return tok, AutoModelForCausalLM.from_config(config).eval()


def write_tiny_llama_gguf(dest: Path, *, architecture: str = "llama", drop_tensors: tuple[str, ...] = (),
                          eos_token_id: int | None = None, tensor_type: str = "F32", tokenizer: bool = True,
                          split: tuple[int, int] | None = None) -> Path:
    """Write a tiny random Llama (tiny_llama_model) to `dest` (a .gguf path); `architecture` is the
    general.architecture it states; `drop_tensors` are GGUF tensor names left out of the file;
    `eos_token_id` replaces the tokenizer's in the metadata; `tensor_type` is the GGML type of its 2-D
    tensors (F32, F16, Q8_0, Q4_0, ...: quantized with gguf's own quantize; F64, which gguf cannot dequantize;
    1-D norms stay F32); `tokenizer`
    False leaves the tokenizer out of the metadata; `split` (part index, part count) writes the split.* keys of
    the first file of llama.cpp's gguf-split (the rest of the tensors would be in the other parts: drop them)."""
    import gguf

    tok, model = tiny_llama_model()
    config = model.config
    qtype = gguf.GGMLQuantizationType[tensor_type]
    writer = gguf.GGUFWriter(str(dest), architecture)
    writer.add_name("tiny-llama")
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(8)
    if split is not None:
        writer.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_NO, split[0])
        writer.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, split[1])
        writer.add_int32(gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, len(model.state_dict()))
    if tokenizer:              # without: no tokenizer.ggml.* keys (and no vocab_size, as the converters write it)
        vocab = tok.get_vocab()
        tokens = sorted(vocab, key=vocab.get)
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_types([3 if t in tok.all_special_tokens else 1 for t in tokens])
        merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
        writer.add_bos_token_id(tok.bos_token_id)
        writer.add_eos_token_id(tok.eos_token_id if eos_token_id is None else eos_token_id)
        writer.add_pad_token_id(tok.pad_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for hf_name, tensor in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        if name in drop_tensors:
            continue
        array = tensor.float().numpy()
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            array = _permute(array, 4 if "attn_q" in name else 2)
        if array.ndim == 2 and qtype == gguf.GGMLQuantizationType.F64:   # a type gguf writes but does not read
            writer.add_tensor(name, array.astype("float64"), raw_dtype=qtype)
        elif array.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(dest)
