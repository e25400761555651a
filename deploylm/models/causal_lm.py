"""Decoder-only variant of the seed model: the same pre-LN blocks without cross-attention.

Left padding is handled by an attention mask over past + new tokens and explicit position ids,
as in Hugging Face; the KV cache is passed in and returned (the model keeps no state).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deploylm.errors import UsageError
from deploylm.models.config import TransformerConfig
from deploylm.models.transformer import KV, AttentionRecord, DecoderLayer, causal_mask, empty_past, init_weights, sinusoidal_table


def position_ids_from_mask(attention_mask: Tensor, new_len: int) -> Tensor:
    """attention_mask [B, P+T] -> position ids [B, T] of the last T tokens (cumsum - 1, >= 0)."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, P+T]
    return positions[:, positions.shape[1] - new_len:]


class CausalTransformerLM(nn.Module):
    """Causal LM over `config.n_decoder_layers` blocks; `forward` serves training, prefill and decode."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        if config.arch != "decoder":
            raise UsageError(f"CausalTransformerLM needs arch 'decoder', got {config.arch!r}: use Seq2SeqTransformer")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.register_buffer("positions", sinusoidal_table(config.max_positions, config.d_model), persistent=False)
        self.layers = nn.ModuleList(DecoderLayer(config, cross=False) for _ in range(config.n_decoder_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        init_weights(self, config.d_model)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
        past: list[KV] | None = None,
    ) -> tuple[Tensor, list[KV]]:
        """input_ids [B, T], attention_mask [B, P+T] (1 = token), position_ids [B, T],
        past: per layer [B, H, P, Dh] (None or length 0) -> (logits [B, T, V], present [B, H, P+T, Dh])."""
        return self._run(input_ids, attention_mask, position_ids, past, None)

    @torch.no_grad()
    def attention_maps(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> list[Tensor]:
        """Self-attention weights per layer [B, H, T, T] over input_ids [B, T] (no cache); rows sum to 1."""
        record: list[Tensor] = []
        self._run(input_ids, attention_mask, None, None, record)
        return record

    def _run(
        self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None,
        past: list[KV] | None, record: AttentionRecord,
    ) -> tuple[Tensor, list[KV]]:
        """`forward`, with each block's self-attention weights appended to `record` when given."""
        past_len = 0 if past is None else past[0][0].shape[2]
        batch, new = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_len + new, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, new)
        self._check_positions(position_ids)
        x = self.embed(input_ids) * math.sqrt(self.config.d_model) + self.positions[position_ids].to(self.embed.weight.dtype)
        x = self.dropout(x)  # [B, T, D]
        mask = self_mask(attention_mask, past_len, new)  # [B, 1, T, P+T]
        present = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, mask, None if past is None else past[i], record=(record, None))
            present.append(kv)
        h = self.norm(x)
        logits = self.lm_head(h) if self.lm_head is not None else F.linear(h, self.embed.weight)
        return logits, present

    def empty_past(self, rows: int) -> list[KV]:
        """A length-0 cache (per layer [B, H, 0, Dh]): the first past for exporters."""
        return empty_past(self.config, len(self.layers), rows, self.embed.weight)

    def _check_positions(self, position_ids: Tensor) -> None:
        if torch.compiler.is_compiling() or position_ids.numel() == 0:
            return
        end = int(position_ids.max()) + 1
        if end > self.config.max_positions:
            raise UsageError(f"sequence of {end} positions exceeds the model's max_positions={self.config.max_positions}: shorten the input or max_new_tokens")


def self_mask(attention_mask: Tensor, past_len: int, new_len: int) -> Tensor:
    """[B, 1, T, P+T] bool: causal and not padding; every token also sees itself (no empty rows)."""
    allowed = causal_mask(past_len, new_len, attention_mask.device)[None, None] & attention_mask[:, None, None, :].bool()
    keys = torch.arange(past_len + new_len, device=attention_mask.device)
    diagonal = keys[None, :] == (torch.arange(new_len, device=attention_mask.device) + past_len)[:, None]  # [T, P+T]
    return allowed | diagonal
