"""deploylm's own models (Seq2SeqTransformer, CausalTransformerLM) as export-ready flat-IO modules.

Inputs and outputs follow deploylm.export.io_spec order. The seed decoder takes cross K/V at one
row per input (enc_batch) and R = enc_batch × beams query rows, exactly as `decode_step` does, so
the encoder output is never copied per beam.
"""
from __future__ import annotations

from torch import Tensor, nn

from deploylm.export.io_spec import ModelDims


def _pairs(flat: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    return [(flat[2 * i], flat[2 * i + 1]) for i in range(len(flat) // 2)]


class SeedEncoderGraph(nn.Module):
    """encoder_model.onnx: (ids [B,S], mask [B,S]) -> (memory [B,S,D], *cross K/V [B,H,S,Dh])."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        input_ids, attention_mask = inputs
        memory = self.model.encode(input_ids, attention_mask)  # [B, S, D]
        return (memory, *[t for kv in self.model.cross_kv(memory) for t in kv])


class SeedDecoderGraph(nn.Module):
    """decoder_model.onnx: (ids [R,T], src mask [B,S], *self past [R,..], *cross [B,..]) -> (logits [R,1,V], *present)."""

    def __init__(self, model: nn.Module, n_layers: int):
        super().__init__()
        self.model, self.n_layers = model, n_layers

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        input_ids, src_mask, *kv = inputs
        n = 2 * self.n_layers
        logits, present = self.model.decode_step(input_ids, _pairs(kv[:n]), _pairs(kv[n:]), src_mask)
        return (logits[:, -1:, :].float(), *[t for pair in present for t in pair])  # [R, 1, V]


class SeedCausalGraph(nn.Module):
    """model.onnx of CausalTransformerLM: (ids, mask, positions, *past) -> (logits [B,1,V], *present)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        input_ids, attention_mask, position_ids, *past = inputs
        logits, present = self.model(input_ids, attention_mask, position_ids, _pairs(past))
        return (logits[:, -1:, :].float(), *[t for pair in present for t in pair])


def seed_dims(config) -> ModelDims:
    """ModelDims from a deploylm TransformerConfig."""
    return ModelDims(n_layers=config.n_decoder_layers, kv_heads=config.n_heads, head_dim=config.head_dim,
                     vocab_size=config.vocab_size, d_model=config.d_model, cross_heads=config.n_heads)
