"""Torch backends over deploylm's own checkpoints: the seed encoder-decoder and the causal LM.

Encoder-decoder: `prefill` encodes each input once, projects the cross-attention K/V once, and runs
the first decoder step on the decoder start token. The cross K/V stay at one row per input (B rows,
never expanded per beam): Seq2SeqTransformer.decode_step maps row r to input r // (R // B). `reorder`
gathers the self-attention cache only; should a reorder ever break that layout (rows of one input
not contiguous), the cross K/V are gathered to one row per decoder row, which decode_step also takes.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from deploylm.backends.base import EncodedBatch, ModelInfo, SpecialTokens
from deploylm.backends.torch_backend import TorchBackend, is_identity
from deploylm.models.hf import decoding_defaults, generation_settings
from deploylm.models.source import Source

KV = tuple[Tensor, Tensor]


def seed_special_tokens(config: Mapping[str, Any], gen: Mapping[str, Any]) -> SpecialTokens:
    """A deploylm checkpoint's special tokens: generation_config.json first, then config.json.

    Shared by every backend that opens a deploylm checkpoint or its artifact.
    """
    eos = gen.get("eos_token_id", config["eos_token_id"])
    return SpecialTokens(
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (int(eos),),
        pad_token_id=int(gen.get("pad_token_id", config["pad_token_id"])),
        bos_token_id=int(gen.get("bos_token_id", config["bos_token_id"])),
        decoder_start_token_id=int(gen.get("decoder_start_token_id", config["decoder_start_token_id"]))
        if config.get("arch") == "seq2seq" else None,
    )


def open_checkpoint(source: Source, *, dtype: torch.dtype, device: torch.device) -> TorchBackend:
    """The torch backend for a deploylm checkpoint folder (seq2seq or decoder-only)."""
    from deploylm.models.checkpoint import load_checkpoint, load_generation_config

    model, config = load_checkpoint(source.path, device=device)
    model = model.to(dtype).eval()
    gen = load_generation_config(source.path)
    special = seed_special_tokens(config.to_dict(), gen)
    info = ModelInfo(is_encoder_decoder=config.arch == "seq2seq", vocab_size=config.vocab_size, special=special,
                     max_positions=config.max_positions, name=source.name,
                     generation=generation_settings(gen))   # model-level processors, as its artifact applies them
    defaults = decoding_defaults(gen, source.name)
    impl = DeployLMSeq2SeqBackend if info.is_encoder_decoder else DeployLMCausalBackend
    return impl(model, info, device, defaults)


@dataclass(frozen=True)
class SeedSeq2SeqState:
    """R decoder rows over C rows of encoder memory (C = B after prefill; R a multiple of C)."""

    self_past: list[KV]   # per layer (k, v), each [R, H, P, Dh]
    cross: list[KV]       # per layer (k, v), each [C, H, S, Dh]
    src_mask: Tensor      # [C, S]
    cross_row: Tensor     # [R] the cross row each decoder row reads


class DeployLMSeq2SeqBackend(TorchBackend):
    """Seq2SeqTransformer checkpoints ("deploylm-seq2seq")."""

    def _setup(self) -> None:
        self.encoder_calls = 0  # inputs encoded so far (rows): tests check once per input

    def _prefill(self, batch: EncodedBatch) -> tuple[Tensor, SeedSeq2SeqState]:
        ids, mask = batch.input_ids, batch.attention_mask                      # [B, S]
        memory = self.model.encode(ids, mask)                                   # [B, S, D]
        self.encoder_calls += ids.shape[0]
        cross = self.model.cross_kv(memory)
        start = torch.full((ids.shape[0], 1), self.info.special.decoder_start_token_id, dtype=torch.long, device=ids.device)
        logits, present = self.model.decode_step(start, None, cross, mask)      # [B, 1, V]
        state = SeedSeq2SeqState(present, cross, mask, torch.arange(ids.shape[0], device=ids.device))
        return logits[:, -1, :].float(), state

    def _decode(self, tokens: Tensor, state: SeedSeq2SeqState) -> tuple[Tensor, SeedSeq2SeqState]:
        logits, present = self.model.decode_step(tokens[:, None], state.self_past, state.cross, state.src_mask)
        return logits[:, -1, :].float(), SeedSeq2SeqState(present, state.cross, state.src_mask, state.cross_row)

    def _reorder(self, state: SeedSeq2SeqState, beam_idx: Tensor) -> SeedSeq2SeqState:
        if is_identity(beam_idx, state.cross_row.shape[0]):
            return state
        past = [(k.index_select(0, beam_idx), v.index_select(0, beam_idx)) for k, v in state.self_past]
        cross_row = state.cross_row.index_select(0, beam_idx)
        rows, memory_rows = cross_row.shape[0], state.src_mask.shape[0]
        if rows % memory_rows == 0 and torch.equal(
                cross_row, torch.arange(memory_rows, device=cross_row.device).repeat_interleave(rows // memory_rows)):
            return SeedSeq2SeqState(past, state.cross, state.src_mask, cross_row)
        cross = [(k.index_select(0, cross_row), v.index_select(0, cross_row)) for k, v in state.cross]
        return SeedSeq2SeqState(past, cross, state.src_mask.index_select(0, cross_row),
                                torch.arange(rows, device=cross_row.device))


@dataclass(frozen=True)
class SeedCausalState:
    past: list[KV]          # per layer (k, v), each [R, H, P, Dh]
    attention_mask: Tensor  # [R, P]
    next_position: Tensor   # [R]


class DeployLMCausalBackend(TorchBackend):
    """CausalTransformerLM checkpoints ("deploylm-lm"): left padding, mask, explicit positions."""

    def _prefill(self, batch: EncodedBatch) -> tuple[Tensor, SeedCausalState]:
        ids, mask = batch.input_ids, batch.attention_mask                      # [B, T]
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)             # [B, T]
        logits, present = self.model(ids, mask, positions, None)                # [B, T, V]
        return logits[:, -1, :].float(), SeedCausalState(present, mask, positions[:, -1] + 1)

    def _decode(self, tokens: Tensor, state: SeedCausalState) -> tuple[Tensor, SeedCausalState]:
        mask = torch.cat([state.attention_mask, state.attention_mask.new_ones((tokens.shape[0], 1))], dim=1)
        logits, present = self.model(tokens[:, None], mask, state.next_position[:, None], state.past)
        return logits[:, -1, :].float(), SeedCausalState(present, mask, state.next_position + 1)

    def _reorder(self, state: SeedCausalState, beam_idx: Tensor) -> SeedCausalState:
        if is_identity(beam_idx, state.attention_mask.shape[0]):
            return state
        past = [(k.index_select(0, beam_idx), v.index_select(0, beam_idx)) for k, v in state.past]
        return SeedCausalState(past, state.attention_mask.index_select(0, beam_idx),
                               state.next_position.index_select(0, beam_idx))
