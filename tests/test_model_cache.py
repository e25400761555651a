"""Seq2SeqTransformer: the explicit KV cache reproduces the full forward pass, beams share memory."""
from __future__ import annotations

import math

import pytest
import torch

from deploylm.errors import UsageError
from deploylm.models.config import make_config
from deploylm.models.transformer import Seq2SeqTransformer, attend, sinusoidal_table

ATOL = 1e-5  # issue 2: incremental decoding equals the full forward within 1e-5
VOCAB = 40


def build(tied: bool = True, **overrides) -> Seq2SeqTransformer:
    torch.manual_seed(0)
    return Seq2SeqTransformer(make_config("tiny", VOCAB, dropout=0.0, tie_embeddings=tied, **overrides)).eval()


def batch(b: int = 2, s: int = 7, t: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source [b, s] with row i padded by i tokens (pad id 0), mask, target [b, t]."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, VOCAB, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    for i in range(b):
        mask[i, s - i:] = 0
    src = src.masked_fill(mask == 0, 0)
    return src, mask, torch.randint(3, VOCAB, (b, t), generator=g)


def decode_incrementally(model, src, mask, tgt, chunks, empty_past=False):
    """Feed tgt [R, T] in chunks of the given sizes through decode_step; returns logits [R, T, V]."""
    cross = model.cross_kv(model.encode(src, mask))
    past = model.empty_past(tgt.shape[0]) if empty_past else None
    out, start = [], 0
    for size in chunks:
        logits, past = model.decode_step(tgt[:, start:start + size], past, cross, mask)
        assert past[0][0].shape == (tgt.shape[0], model.config.n_heads, start + size, model.config.head_dim)
        out.append(logits)
        start += size
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("tied", [True, False])
def test_token_by_token_equals_full_forward(tied):
    model = build(tied)
    src, mask, tgt = batch()
    with torch.no_grad():
        full = model(src, mask, tgt)
        step = decode_incrementally(model, src, mask, tgt, [1] * tgt.shape[1])
    assert full.shape == (2, 6, VOCAB)
    assert (step - full).abs().max() <= ATOL


def test_chunked_prefill_and_empty_past_equal_full_forward():
    model = build()
    src, mask, tgt = batch()
    with torch.no_grad():
        full = model(src, mask, tgt)
        chunked = decode_incrementally(model, src, mask, tgt, [3, 1, 2])
        empty = decode_incrementally(model, src, mask, tgt, [1] * 6, empty_past=True)
    assert (chunked - full).abs().max() <= ATOL
    assert (empty - full).abs().max() <= ATOL


@pytest.mark.parametrize("chunks", [[1] * 5, [2, 3]])
def test_beams_attend_to_unexpanded_memory(chunks):
    model = build(tied=False)
    src, mask, _ = batch()
    beams = 3
    tgt = torch.randint(3, VOCAB, (2 * beams, 5), generator=torch.Generator().manual_seed(7))  # distinct rows
    with torch.no_grad():
        expanded = model(src.repeat_interleave(beams, 0), mask.repeat_interleave(beams, 0), tgt)
        step = decode_incrementally(model, src, mask, tgt, chunks)
    assert (step - expanded).abs().max() <= ATOL


def test_source_padding_does_not_change_other_rows_or_real_tokens():
    model = build()
    src, mask, tgt = batch(b=2, s=7)
    with torch.no_grad():
        together = model(src, mask, tgt)
        alone0 = model(src[:1], mask[:1], tgt[:1])
        alone1 = model(src[1:2, :6], mask[1:2, :6], tgt[1:2])  # row 1 without its padding column
        garbage = model(src.masked_fill(mask == 0, 17), mask, tgt)  # pad positions hold other ids
    assert (together[:1] - alone0).abs().max() <= ATOL
    assert (together[1:] - alone1).abs().max() <= ATOL
    assert (garbage - together).abs().max() <= ATOL


def test_decoder_is_causal():
    model = build()
    src, mask, tgt = batch()
    changed = tgt.clone()
    changed[:, 4:] = 5
    with torch.no_grad():
        a, b = model(src, mask, tgt), model(src, mask, changed)
    assert (a[:, :4] - b[:, :4]).abs().max() <= ATOL
    assert (a[:, 4:] - b[:, 4:]).abs().max() > ATOL


def test_tied_model_stores_one_embedding():
    tied, untied = build(True).state_dict(), build(False).state_dict()
    assert "src_embed.weight" in tied and not any(k.startswith(("tgt_embed", "lm_head")) for k in tied)
    assert {"src_embed.weight", "tgt_embed.weight", "lm_head.weight"} <= set(untied)
    assert not any("positions" in k for k in tied)  # the sinusoid table is recomputed, not stored


def test_positions_beyond_max_positions_are_a_usage_error():
    model = build(max_positions=8)
    src, mask, tgt = batch(t=9)
    with pytest.raises(UsageError, match="max_positions=8"):
        model(src, mask, tgt)


def test_attention_maps_shapes_and_padding():
    model = build()
    src, mask, tgt = batch()
    maps = model.attention_maps(src, mask, tgt)
    layers, heads = model.config.n_encoder_layers, model.config.n_heads
    assert [m.shape for m in maps["encoder"]] == [(2, heads, 7, 7)] * layers
    assert [m.shape for m in maps["decoder"]] == [(2, heads, 6, 6)] * model.config.n_decoder_layers
    assert [m.shape for m in maps["cross"]] == [(2, heads, 6, 7)] * model.config.n_decoder_layers
    for m in maps["cross"]:
        assert torch.allclose(m.sum(-1), torch.ones(()), atol=ATOL)
        assert m[1, :, :, 6].abs().max() == 0  # row 1's padded source position gets no weight
    assert maps["decoder"][0][0, 0].triu(1).abs().max() == 0  # causal


def test_model_learns_to_copy():
    """A few optimizer steps on a fixed batch drive the loss down (gradients reach every part)."""
    torch.manual_seed(0)
    model = Seq2SeqTransformer(make_config("tiny", VOCAB, dropout=0.0, n_encoder_layers=1, n_decoder_layers=1))
    src, mask, _ = batch(b=4, s=6)
    tgt_in = torch.cat([torch.ones(4, 1, dtype=torch.long), src], dim=1)  # start token, then the source
    labels = torch.cat([src, torch.full((4, 1), 2)], dim=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(src, mask, tgt_in).transpose(1, 2), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]


def test_position_table_is_the_papers_sinusoid():
    # PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)) (Vaswani et al. 3.5)
    d = 6
    table = sinusoidal_table(5, d)
    for pos in range(5):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert float(table[pos, 2 * i]) == pytest.approx(math.sin(angle), abs=1e-6)
            assert float(table[pos, 2 * i + 1]) == pytest.approx(math.cos(angle), abs=1e-6)
    assert sinusoidal_table(3, 5).shape == (3, 5)                      # an odd width keeps its last sine


def test_embeddings_are_scaled_by_sqrt_d_model_before_the_positions_are_added():
    model = build(tied=False)
    src, mask, tgt = batch()
    seen = {}

    def keep(name):
        def hook(module, args):
            seen[name] = args[0]                                          # the layer's input [B, T, D]
        return hook

    model.encoder_layers[0].register_forward_pre_hook(keep("enc"))
    model.decoder_layers[0].register_forward_pre_hook(keep("dec"))
    d = model.config.d_model
    with torch.no_grad():
        model(src, mask, tgt)
        assert torch.allclose(seen["enc"], model.src_embed(src) * math.sqrt(d) + model.positions[:src.shape[1]], atol=1e-5)
        assert torch.allclose(seen["dec"], model.tgt_embed(tgt) * math.sqrt(d) + model.positions[:tgt.shape[1]], atol=1e-5)
        cross = model.cross_kv(model.encode(src, mask))
        _, past = model.decode_step(tgt[:, :3], None, cross, mask)
        model.decode_step(tgt[:, 3:4], past, cross, mask)              # the 4th token sits at position 3
        assert torch.allclose(seen["dec"], model.tgt_embed(tgt[:, 3:4]) * math.sqrt(d) + model.positions[3], atol=1e-5)


def test_recorded_attention_weights_are_scaled_softmax_and_give_the_same_output():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 4, 8, generator=g) for _ in range(3))      # [B, H, T, Dh]
    mask = torch.tensor([True, True, False, True])[None, None, None, :]
    record = []
    out = attend(q, k, v, mask, 0.0, record)
    want = ((q @ k.transpose(-2, -1)) / math.sqrt(8)).masked_fill(~mask, float("-inf")).softmax(-1)
    torch.testing.assert_close(record[0], want)
    assert record[0][..., 2].abs().max() == 0                          # the masked key gets no weight
    torch.testing.assert_close(out, attend(q, k, v, mask, 0.0, None))   # the SDPA path computes the same
