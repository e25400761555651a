"""A minimal Backend over a Hugging Face model, used only to pin the decoder to `transformers.generate`.

Plain HF forward with the cache: decoder-only prompts are left-padded with explicit position ids from
the attention mask (as transformers does); encoder-decoder runs the encoder once in `prefill`.
`reorder` uses the cache's own `reorder_cache`. The real backend is deploylm.backends.torch_backend.
"""
from __future__ import annotations

import torch
from torch import Tensor

from deploylm.backends.base import EncodedBatch, ModelInfo, SpecialTokens
from deploylm.models.hf import cache_keyword, cache_of


def special_tokens(model) -> SpecialTokens:
    cfg = model.generation_config
    eos = cfg.eos_token_id
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else eos[0]
    start = cfg.decoder_start_token_id
    if start is None:
        start = getattr(model.config, "decoder_start_token_id", None)
    return SpecialTokens(eos_token_ids=eos, pad_token_id=pad, bos_token_id=cfg.bos_token_id,
                         decoder_start_token_id=start)


class HFBackend:
    name = "hf-test"

    def __init__(self, model):
        self.model = model.eval()
        self.device = torch.device("cpu")
        self.is_enc_dec = bool(model.config.is_encoder_decoder)
        self.info = ModelInfo(is_encoder_decoder=self.is_enc_dec, vocab_size=model.config.vocab_size,
                              special=special_tokens(model), name="hf-test")

    @torch.no_grad()
    def prefill(self, batch: EncodedBatch) -> tuple[Tensor, dict]:
        ids, mask = batch.input_ids, batch.attention_mask
        if self.is_enc_dec:
            enc = self.model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            start = torch.full((ids.shape[0], 1), self.info.special.decoder_start_token_id, dtype=torch.long)
            out = self.model(encoder_outputs=(enc,), attention_mask=mask, decoder_input_ids=start, use_cache=True)
            state = {"cache": cache_of(out), "enc": enc, "mask": mask}
        else:
            pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            out = self.model(input_ids=ids, attention_mask=self._mask(mask), position_ids=pos, use_cache=True)
            state = {"cache": cache_of(out), "mask": mask, "pos": pos[:, -1]}
        return out.logits[:, -1].float(), state

    @torch.no_grad()
    def decode(self, tokens: Tensor, state: dict) -> tuple[Tensor, dict]:
        if self.is_enc_dec:
            out = self.model(encoder_outputs=(state["enc"],), attention_mask=state["mask"],
                             decoder_input_ids=tokens[:, None], use_cache=True, **{cache_keyword(self.model): state["cache"]})
            return out.logits[:, -1].float(), {**state, "cache": cache_of(out)}
        mask = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], dim=1)
        pos = state["pos"] + 1
        out = self.model(input_ids=tokens[:, None], attention_mask=self._mask(mask), position_ids=pos[:, None],
                         use_cache=True, **{cache_keyword(self.model): state["cache"]})
        return out.logits[:, -1].float(), {"cache": cache_of(out), "mask": mask, "pos": pos}

    def reorder(self, state: dict, beam_idx: Tensor) -> dict:
        state["cache"].reorder_cache(beam_idx)
        return {k: (v if k == "cache" else v.index_select(0, beam_idx)) for k, v in state.items()}

    @staticmethod
    def _mask(mask: Tensor) -> Tensor | None:
        return None if bool((mask == 1).all()) else mask   # as generate(): no mask when nothing is padded
