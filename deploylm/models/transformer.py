"""The seed encoder-decoder Transformer (Vaswani et al. 2017, pre-LayerNorm) with an explicit KV cache.

Shapes: B inputs, R = B * N decoder rows (N beams per input, rows of one input contiguous),
S source length, T new target tokens, P cached target tokens, H heads, Dh head size, D model size.
A KV pair is a tuple (key, value) of [rows, H, length, Dh] tensors; caches are lists of pairs,
one per decoder layer, passed in and returned: the model keeps no state between calls.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deploylm.errors import UsageError
from deploylm.models.config import TransformerConfig

KV = tuple[Tensor, Tensor]
AttentionRecord = list[Tensor] | None  # when a list, layers append their attention weights to it


def sinusoidal_table(max_positions: int, d_model: int) -> Tensor:
    """[max_positions, D] sin/cos position table of the paper."""
    pos = torch.arange(max_positions, dtype=torch.float32)[:, None]  # [L, 1]
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(max_positions, d_model)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : d_model // 2]
    return table


def check_positions(end: int, max_positions: int) -> None:
    """Clear error for sequences longer than the position table (skipped while exporting)."""
    if not torch.compiler.is_compiling() and end > max_positions:
        raise UsageError(f"sequence of {end} positions exceeds the model's max_positions={max_positions}: shorten the input or max_new_tokens")


def causal_mask(past_len: int, new_len: int, device: torch.device) -> Tensor:
    """[T, P+T] bool, True where new token i (position P+i) may attend to key j: j <= P+i."""
    keys = torch.arange(past_len + new_len, device=device)  # [P+T]
    queries = torch.arange(new_len, device=device) + past_len  # [T]
    return keys[None, :] <= queries[:, None]


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, dropout_p: float, record: AttentionRecord) -> Tensor:
    """Scaled dot-product attention; mask is bool (True = attend) broadcastable to [.., Tq, Tk].

    With `record`, weights are computed explicitly (SDPA does not return them) and appended.
    """
    if record is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # [.., Tq, Tk]
    weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    record.append(weights.detach())
    return weights @ v


class MultiHeadAttention(nn.Module):
    """Projections around `attend`; keys/values are projected separately so they can be cached."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.d_model)
        self.k_proj = nn.Linear(config.d_model, config.d_model)
        self.v_proj = nn.Linear(config.d_model, config.d_model)
        self.out_proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout

    def split(self, x: Tensor) -> Tensor:
        """[B, T, D] -> [B, H, T, Dh]"""
        return x.reshape(x.shape[0], x.shape[1], self.n_heads, self.head_dim).transpose(1, 2)

    def merge(self, x: Tensor) -> Tensor:
        """[B, H, T, Dh] -> [B, T, D]"""
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], self.n_heads * self.head_dim)

    def project_kv(self, x: Tensor) -> KV:
        return self.split(self.k_proj(x)), self.split(self.v_proj(x))  # each [B, H, S, Dh]

    def self_attention(self, x: Tensor, mask: Tensor, past: KV | None, record: AttentionRecord = None) -> tuple[Tensor, KV]:
        """x [R, T, D], past [R, H, P, Dh] (or None) -> ([R, T, D], present [R, H, P+T, Dh])."""
        k, v = self.project_kv(x)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        out = attend(self.split(self.q_proj(x)), k, v, mask, self._dropout_p(), record)
        return self.out_proj(self.merge(out)), (k, v)

    def cross_attention(self, x: Tensor, cross: KV, src_mask: Tensor, record: AttentionRecord = None) -> Tensor:
        """x [R, T, D] attends to cross [B, H, S, Dh] without copying it per beam (R = B * N)."""
        batch, heads, dh = cross[0].shape[0], self.n_heads, self.head_dim
        rows, new = x.shape[0], x.shape[1]
        q = self.split(self.q_proj(x))  # [R, H, T, Dh]
        q = q.reshape(batch, -1, heads, new, dh).transpose(1, 2).reshape(batch, heads, -1, dh)  # [B, H, N*T, Dh]
        mask = src_mask[:, None, None, :].bool()  # [B, 1, 1, S]
        sub = None if record is None else []
        out = attend(q, cross[0], cross[1], mask, self._dropout_p(), sub)  # [B, H, N*T, Dh]
        if record is not None:
            record.append(sub[0].reshape(batch, heads, -1, new, sub[0].shape[-1]).transpose(1, 2).reshape(rows, heads, new, -1))
        out = out.reshape(batch, heads, -1, new, dh).transpose(1, 2).reshape(rows, heads, new, dh)  # [R, H, T, Dh]
        return self.out_proj(self.merge(out))

    def _dropout_p(self) -> float:
        return self.dropout if self.training else 0.0


class FeedForward(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.d_ff)
        self.fc2 = nn.Linear(config.d_ff, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(F.relu(self.fc1(x))))


class EncoderLayer(nn.Module):
    """Pre-LN: x + SelfAttn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.self_attn, self.ffn = MultiHeadAttention(config), FeedForward(config)
        self.norm1, self.norm2 = nn.LayerNorm(config.d_model), nn.LayerNorm(config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, mask: Tensor, record: AttentionRecord = None) -> Tensor:
        h, _ = self.self_attn.self_attention(self.norm1(x), mask, None, record)
        x = x + self.dropout(h)
        return x + self.dropout(self.ffn(self.norm2(x)))


class DecoderLayer(nn.Module):
    """Pre-LN masked self-attention (cached), cross-attention (seq2seq only), feed-forward."""

    def __init__(self, config: TransformerConfig, cross: bool = True):
        super().__init__()
        self.self_attn, self.ffn = MultiHeadAttention(config), FeedForward(config)
        self.cross_attn = MultiHeadAttention(config) if cross else None
        self.norm1, self.norm3 = nn.LayerNorm(config.d_model), nn.LayerNorm(config.d_model)
        self.norm2 = nn.LayerNorm(config.d_model) if cross else None
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, self_mask: Tensor, past: KV | None, cross: KV | None = None, src_mask: Tensor | None = None,
        record: tuple[AttentionRecord, AttentionRecord] = (None, None),
    ) -> tuple[Tensor, KV]:
        h, present = self.self_attn.self_attention(self.norm1(x), self_mask, past, record[0])
        x = x + self.dropout(h)
        if self.cross_attn is not None:
            x = x + self.dropout(self.cross_attn.cross_attention(self.norm2(x), cross, src_mask, record[1]))
        return x + self.dropout(self.ffn(self.norm3(x))), present


def empty_past(config: TransformerConfig, layers: int, rows: int, like: Tensor) -> list[KV]:
    """Per layer (key, value) of shape [rows, H, 0, Dh] with the dtype and device of `like`."""
    shape = (rows, config.n_heads, 0, config.head_dim)
    return [(like.new_zeros(shape), like.new_zeros(shape)) for _ in range(layers)]


def init_weights(module: nn.Module, d_model: int) -> None:
    """Xavier-uniform linear layers, N(0, d_model^-0.5) embeddings (they are scaled by sqrt(d_model))."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=d_model**-0.5)


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder Transformer; `forward` for training, encode/cross_kv/decode_step for inference."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        if config.arch != "seq2seq":
            raise UsageError(f"Seq2SeqTransformer needs arch 'seq2seq', got {config.arch!r}: use CausalTransformerLM")
        self.config = config
        self.src_embed = nn.Embedding(config.vocab_size, config.d_model)
        self.tgt_embed = None if config.tie_embeddings else nn.Embedding(config.vocab_size, config.d_model)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.register_buffer("positions", sinusoidal_table(config.max_positions, config.d_model), persistent=False)
        self.encoder_layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_decoder_layers))
        self.encoder_norm, self.decoder_norm = nn.LayerNorm(config.d_model), nn.LayerNorm(config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        init_weights(self, config.d_model)

    def _embed(self, table: nn.Embedding, ids: Tensor, start: int | Tensor) -> Tensor:
        """ids [B, T] at positions start..start+T-1 -> [B, T, D] (scaled token + sinusoid)."""
        check_positions(start + ids.shape[1], self.config.max_positions)
        pos = torch.arange(ids.shape[1], device=ids.device) + start  # [T]
        x = table(ids) * math.sqrt(self.config.d_model) + self.positions[pos].to(table.weight.dtype)
        return self.dropout(x)

    def forward(self, src_ids: Tensor, src_mask: Tensor, tgt_ids: Tensor) -> Tensor:
        """Teacher forcing: src [B, S], mask [B, S] (1 = token), tgt [B, T] -> logits [B, T, V]."""
        memory = self.encode(src_ids, src_mask)
        logits, _ = self.decode_step(tgt_ids, None, self.cross_kv(memory), src_mask)
        return logits

    def encode(self, src_ids: Tensor, src_mask: Tensor, record: AttentionRecord = None) -> Tensor:
        """src [B, S] -> memory [B, S, D]. Padding keys are masked; each position sees itself."""
        x = self._embed(self.src_embed, src_ids, 0)
        seq = src_ids.shape[1]
        eye = torch.eye(seq, dtype=torch.bool, device=src_ids.device)  # keeps all-padding rows finite
        mask = src_mask[:, None, None, :].bool() | eye  # [B, 1, S, S]
        for layer in self.encoder_layers:
            x = layer(x, mask, record)
        return self.encoder_norm(x)

    def cross_kv(self, memory: Tensor) -> list[KV]:
        """memory [B, S, D] -> per decoder layer (key, value), each [B, H, S, Dh]; once per input."""
        return [layer.cross_attn.project_kv(memory) for layer in self.decoder_layers]

    def decode_step(
        self, tgt_ids: Tensor, self_past: list[KV] | None, cross: list[KV], src_mask: Tensor,
        record: tuple[AttentionRecord, AttentionRecord] = (None, None),
    ) -> tuple[Tensor, list[KV]]:
        """tgt [R, T] at positions P..P+T-1 -> (logits [R, T, V], present: per layer [R, H, P+T, Dh]).

        self_past: per layer [R, H, P, Dh] (None or length-0 tensors for the first step).
        cross: per layer [B, H, S, Dh] with R a multiple of B; src_mask [B, S].
        """
        past_len = 0 if self_past is None else self_past[0][0].shape[2]
        x = self._embed(self.src_embed if self.tgt_embed is None else self.tgt_embed, tgt_ids, past_len)
        mask = causal_mask(past_len, tgt_ids.shape[1], tgt_ids.device)  # [T, P+T]
        present = []
        for i, layer in enumerate(self.decoder_layers):
            past = None if self_past is None else self_past[i]
            x, kv = layer(x, mask, past, cross[i], src_mask, record)
            present.append(kv)
        return self.project(self.decoder_norm(x)), present

    def empty_past(self, rows: int) -> list[KV]:
        """A length-0 self-attention cache (per layer [R, H, 0, Dh]): the first past for exporters."""
        return empty_past(self.config, len(self.decoder_layers), rows, self.src_embed.weight)

    def project(self, h: Tensor) -> Tensor:
        """[.., D] -> logits [.., V] (the source embedding when tied)."""
        return self.lm_head(h) if self.lm_head is not None else F.linear(h, self.src_embed.weight)

    @torch.no_grad()
    def attention_maps(self, src_ids: Tensor, src_mask: Tensor, tgt_ids: Tensor) -> dict[str, list[Tensor]]:
        """Attention weights per layer: "encoder" [B, H, S, S], "decoder" [B, H, T, T], "cross" [B, H, T, S]."""
        maps: dict[str, list[Tensor]] = {"encoder": [], "decoder": [], "cross": []}
        memory = self.encode(src_ids, src_mask, maps["encoder"])
        self.decode_step(tgt_ids, None, self.cross_kv(memory), src_mask, (maps["decoder"], maps["cross"]))
        return maps
