"""A Backend whose next-token probabilities are written by hand, for testing the search without a model.

Each row's state is its history: the prompt (padding removed) and the tokens fed to it so far. The
script maps (prompt, generated) to a probability table over the vocabulary; the logits returned are
log(probabilities), so log_softmax gives the table back exactly (a zero probability is -inf). Since
the answer depends on the row's whole history, a wrong `reorder` gives wrong results.
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from deploylm.backends.base import EncodedBatch, ModelInfo, SpecialTokens

Script = Callable[[tuple[int, ...], tuple[int, ...]], Sequence[float]]


def table_script(table: Mapping[tuple[int, ...], Sequence[float]], default: Sequence[float]) -> Script:
    """A script from a table keyed by the generated tokens only (the prompt is ignored)."""
    return lambda prompt, generated: table.get(tuple(generated), default)


def random_script(vocab_size: int, eos_weight: float = 0.6, peak: float = 0.0, eos: int = 1) -> Script:
    """Deterministic pseudo-random tables keyed by (prompt, generated); token 0 (pad) is never generated.

    eos_weight: unnormalized weight of EOS (others uniform in [0.05, 1)); peak: extra weight on one
    random token per history, so that beams tend to agree.
    """
    def script(prompt, generated):
        rng = random.Random(repr((prompt, generated)))
        weights = [0.0] + [rng.uniform(0.05, 1.0) for _ in range(vocab_size - 1)]
        weights[eos] = eos_weight
        choices = [t for t in range(1, vocab_size) if t != eos]
        weights[rng.choice(choices)] += peak
        return [w / sum(weights) for w in weights]
    return script


@dataclass
class ScriptedBackend:
    script: Script
    vocab_size: int
    eos_token_ids: tuple[int, ...] = (1,)
    pad_token_id: int = 0
    is_encoder_decoder: bool = False
    decoder_start_token_id: int | None = None
    name: str = "scripted"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    calls: list[tuple[str, int]] = field(default_factory=list)   # (method, rows) in call order

    @property
    def info(self) -> ModelInfo:
        special = SpecialTokens(eos_token_ids=tuple(self.eos_token_ids), pad_token_id=self.pad_token_id,
                                decoder_start_token_id=self.decoder_start_token_id)
        return ModelInfo(is_encoder_decoder=self.is_encoder_decoder, vocab_size=self.vocab_size,
                         special=special, name="scripted")

    def _logits(self, rows: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> Tensor:
        out = torch.empty((len(rows), self.vocab_size), dtype=torch.float32)
        for r, (prompt, generated) in enumerate(rows):
            probs = list(self.script(prompt, generated))
            assert len(probs) == self.vocab_size, f"script gave {len(probs)} probabilities for {generated}"
            assert abs(sum(probs) - 1.0) < 1e-6, f"probabilities for {generated} sum to {sum(probs)}"
            out[r] = torch.tensor([math.log(p) if p > 0 else -math.inf for p in probs], dtype=torch.float64)
        return out

    def prefill(self, batch: EncodedBatch) -> tuple[Tensor, list]:
        rows = []
        for ids, mask in zip(batch.input_ids.tolist(), batch.attention_mask.tolist()):
            rows.append((tuple(t for t, m in zip(ids, mask) if m), ()))
        self.calls.append(("prefill", len(rows)))
        return self._logits(rows), rows

    def decode(self, tokens: Tensor, state: list) -> tuple[Tensor, list]:
        assert tokens.shape == (len(state),), f"decode got tokens {tuple(tokens.shape)} for {len(state)} rows"
        rows = [(prompt, generated + (int(t),)) for (prompt, generated), t in zip(state, tokens.tolist())]
        self.calls.append(("decode", len(rows)))
        return self._logits(rows), rows

    def reorder(self, state: list, beam_idx: Tensor) -> list:
        self.calls.append(("reorder", int(beam_idx.shape[0])))
        return [state[i] for i in beam_idx.tolist()]


def encode(prompts: Sequence[Sequence[int]], pad_token_id: int = 0, left: bool = True) -> EncodedBatch:
    """Pad token-id prompts into an EncodedBatch (left padding for decoder-only)."""
    width = max(len(p) for p in prompts)
    ids, mask = [], []
    for p in prompts:
        pad = [pad_token_id] * (width - len(p))
        ids.append(pad + list(p) if left else list(p) + pad)
        mask.append([0] * len(pad) + [1] * len(p) if left else [1] * len(p) + [0] * len(pad))
    return EncodedBatch(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long))


@dataclass
class WindowedBackend(ScriptedBackend):
    """A ScriptedBackend whose model has a window of `window` positions (ModelInfo.max_positions): long inputs
    are truncated or slid over it."""

    window: int = 64

    @property
    def info(self) -> ModelInfo:
        return dataclasses.replace(super().info, max_positions=self.window)
