"""Torch backends over Hugging Face transformers models: causal LMs (incl. GGUF) and encoder-decoders.

Both call the model exactly as `transformers.generate` does (same inputs, same transformers Cache
objects), so the logits match and the shared decoder gives the same tokens:
- decoder-only: left-padded prompt, attention mask, position_ids = cumsum(mask) - 1 (0 on padding),
  `logits_to_keep=1`; each decode step appends 1 to the mask and feeds the next position. When no
  prompt is padded the mask is dropped altogether, as transformers.generate does; a model without
  attention layers (a state-space model: Mamba) gets it for the prompt only, as its
  `prepare_inputs_for_generation` has transformers.generate do.
- encoder-decoder: the encoder runs once per input; the first decoder step feeds the decoder start
  token. The encoder output, its mask and the cross-attention K/V are expanded to one row per beam
  (index_select) because the transformers decoder wants them at the decoder's batch size; they are
  only gathered again when the rows' inputs change (beams of one input share them).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from deploylm.backends.base import EncodedBatch
from deploylm.backends.torch_backend import TorchBackend, is_identity
from deploylm.models.hf import cache_keyword, cache_of, not_a_decoder


@dataclass(frozen=True)
class CausalState:
    """Decoder-only state: R rows. `cache` is a transformers Cache, updated in place by decode/reorder."""

    cache: Any
    attention_mask: Tensor | None  # [R, P] int64, 1 = attend; None when no prompt is padded
    next_position: Tensor          # [R] position id of the next token


class HFCausalBackend(TorchBackend):
    """AutoModelForCausalLM (GPT-2, Llama, SmolLM2, Qwen2, Mistral, ... and GGUF files)."""

    def _setup(self) -> None:
        params = inspect.signature(self.model.forward).parameters
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._positions = "position_ids" in params
        self._cache_kw = cache_keyword(self.model)

    def _forward(self, ids: Tensor, mask: Tensor | None, positions: Tensor, cache: Any) -> tuple[Tensor, Any]:
        kwargs = dict(self._extra, position_ids=positions) if self._positions else self._extra
        out = self.model(input_ids=ids, attention_mask=mask, use_cache=True, **{self._cache_kw: cache}, **kwargs)
        return out.logits[:, -1, :].float(), cache_of(out)  # [R, V] fp32, as transformers' beam search casts

    def _prefill(self, batch: EncodedBatch) -> tuple[Tensor, CausalState]:
        from transformers import DynamicCache

        ids, mask = batch.input_ids, batch.attention_mask                       # [B, T]
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)              # [B, T]
        cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        if bool((mask == 1).all()):
            mask = None  # as transformers.generate: no padding, no mask (the causal fast path)
        logits, cache = self._forward(ids, mask, positions, cache)
        if cache is None:
            raise not_a_decoder(self.model)
        if mask is not None and not _attends(cache):
            mask = None   # Mamba's mixers multiply their input by a 2-D mask: [R, P + 1] would broadcast the new token
        return logits, CausalState(cache, mask, positions[:, -1] + 1)

    def _decode(self, tokens: Tensor, state: CausalState) -> tuple[Tensor, CausalState]:
        mask = state.attention_mask
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones((tokens.shape[0], 1))], dim=1)   # [R, P + 1]
        positions = state.next_position[:, None]                                 # [R, 1]
        logits, cache = self._forward(tokens[:, None], mask, positions, state.cache)
        return logits, CausalState(cache, mask, state.next_position + 1)

    def _reorder(self, state: CausalState, beam_idx: Tensor) -> CausalState:
        if is_identity(beam_idx, state.next_position.shape[0]):
            return state
        state.cache.reorder_cache(beam_idx)  # index_select on each layer's keys/values (batch axis)
        mask = None if state.attention_mask is None else state.attention_mask.index_select(0, beam_idx)
        return CausalState(state.cache, mask, state.next_position.index_select(0, beam_idx))


def _attends(cache: Any) -> bool:
    """Whether a transformers Cache holds an attention layer (keys and values), i.e. is not made only of
    state-space / linear-attention layers (Mamba's). A cache that does not say is taken to attend."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return True
    try:
        from transformers.cache_utils import DynamicLayer, LinearAttentionCacheLayerMixin, StaticLayer
    except ImportError:           # pragma: no cover - a transformers without linear-attention cache layers
        return True
    return any(isinstance(layer, (DynamicLayer, StaticLayer)) or not isinstance(layer, LinearAttentionCacheLayerMixin)
               for layer in layers)


@dataclass(frozen=True)
class Seq2SeqState:
    """Encoder-decoder state: R decoder rows; `cache` is a transformers EncoderDecoderCache (in place)."""

    cache: Any
    encoder_hidden: Tensor  # [R, S, D] encoder output, one row per decoder row
    encoder_mask: Tensor    # [R, S]
    row_input: Tensor       # [R] which input each row belongs to


class HFSeq2SeqBackend(TorchBackend):
    """AutoModelForSeq2SeqLM (T5, BART, Marian, ...)."""

    def _setup(self) -> None:
        self.encoder_calls = 0  # inputs encoded so far (rows, not batches): tests check once per input
        self._cache_kw = cache_keyword(self.model)

    def _prefill(self, batch: EncodedBatch) -> tuple[Tensor, Seq2SeqState]:
        from transformers import DynamicCache, EncoderDecoderCache

        ids, mask = batch.input_ids, batch.attention_mask                       # [B, S]
        hidden = self.model.get_encoder()(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state
        self.encoder_calls += ids.shape[0]
        start = torch.full((ids.shape[0], 1), self.info.special.decoder_start_token_id, dtype=torch.long, device=ids.device)
        config = self.model.config.get_text_config(decoder=True)
        cache = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
        state = Seq2SeqState(cache, hidden, mask, torch.arange(ids.shape[0], device=ids.device))
        return self._step(start, state)

    def _step(self, tokens: Tensor, state: Seq2SeqState) -> tuple[Tensor, Seq2SeqState]:
        from transformers.modeling_outputs import BaseModelOutput

        out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=state.encoder_hidden),
                         attention_mask=state.encoder_mask, decoder_input_ids=tokens,
                         use_cache=True, **{self._cache_kw: state.cache})
        return out.logits[:, -1, :].float(), replace(state, cache=cache_of(out))    # [R, V] fp32

    def _decode(self, tokens: Tensor, state: Seq2SeqState) -> tuple[Tensor, Seq2SeqState]:
        return self._step(tokens[:, None], state)

    def _reorder(self, state: Seq2SeqState, beam_idx: Tensor) -> Seq2SeqState:
        rows = state.row_input.shape[0]
        if is_identity(beam_idx, rows):
            return state
        state.cache.self_attention_cache.reorder_cache(beam_idx)
        row_input = state.row_input.index_select(0, beam_idx)
        if rows == row_input.shape[0] and torch.equal(row_input, state.row_input):
            return state  # same input per row: encoder rows and cross K/V are already right
        state.cache.cross_attention_cache.reorder_cache(beam_idx)
        return Seq2SeqState(state.cache, state.encoder_hidden.index_select(0, beam_idx),
                            state.encoder_mask.index_select(0, beam_idx), row_input)
