"""CausalTransformerLM: left padding, explicit positions and the KV cache reproduce the full pass."""
from __future__ import annotations

import math

import torch

from deploylm.models.causal_lm import CausalTransformerLM
from deploylm.models.config import make_config

ATOL = 1e-5
VOCAB = 40


def build(tied: bool = True) -> CausalTransformerLM:
    torch.manual_seed(0)
    return CausalTransformerLM(make_config("tiny", VOCAB, arch="decoder", dropout=0.0, tie_embeddings=tied)).eval()


def left_padded(t: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [2, t] with row 1 left-padded by 3 tokens, and its mask."""
    ids = torch.randint(3, VOCAB, (2, t), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, t, dtype=torch.long)
    mask[1, :3] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_cache_equals_full_forward_with_left_padding():
    model = build(tied=False)
    ids, mask = left_padded()
    with torch.no_grad():
        full, _ = model(ids, mask)
        logits, past = model(ids[:, :4], mask[:, :4])  # prefill
        steps = [logits]
        for t in range(4, ids.shape[1]):
            logits, past = model(ids[:, t:t + 1], mask[:, :t + 1], past=past)
            steps.append(logits)
    real = mask.bool()
    assert (torch.cat(steps, 1) - full)[real].abs().max() <= ATOL
    assert past[0][0].shape == (2, model.config.n_heads, ids.shape[1], model.config.head_dim)


def test_left_padded_row_equals_unpadded_run():
    model = build()
    ids, mask = left_padded()
    with torch.no_grad():
        batched, _ = model(ids, mask)
        alone, _ = model(ids[1:, 3:])  # no padding, positions 0.. from the default mask
    assert (batched[1, 3:] - alone[0]).abs().max() <= ATOL


def test_empty_past_and_explicit_positions_equal_defaults():
    model = build()
    ids, mask = left_padded()
    empty = model.empty_past(2)
    assert [kv[0].shape for kv in empty] == [(2, model.config.n_heads, 0, model.config.head_dim)] * len(model.layers)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a, _ = model(ids, mask)
        b, _ = model(ids, mask, positions, past=empty)
        shifted, _ = model(ids, mask, positions + 1)
    assert (a - b).abs().max() <= ATOL
    assert (a - shifted).abs().max() > ATOL  # position ids are used


def test_embeddings_are_scaled_by_sqrt_d_model_before_the_positions_are_added():
    model = build()
    ids, mask = left_padded()
    seen = {}
    model.layers[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        model(ids, mask)
        want = model.embed(ids) * math.sqrt(model.config.d_model) + model.positions[positions]
    assert torch.allclose(seen["x"], want, atol=1e-5)
