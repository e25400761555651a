"""The seed model's inference API exports with torch.onnx.export(dynamo=True) and dynamic shapes.

One graph (encode -> cross_kv -> decode_step) checks the contract the exporter relies on: rows R a
multiple of batch B, a past of any length including 0, several new tokens, source padding.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.export import Dim

from deploylm.models.config import make_config
from deploylm.models.transformer import Seq2SeqTransformer

ATOL = 1e-4  # fp32 ONNX Runtime vs PyTorch
VOCAB = 40


class EncodeAndStep(torch.nn.Module):
    """(src [B, S], src_mask [B, S], tgt [R, T], past k/v [R, H, P, Dh]) -> logits, present k/v."""

    def __init__(self, model: Seq2SeqTransformer):
        super().__init__()
        self.model = model

    def forward(self, src, src_mask, tgt, past_key, past_value):
        cross = self.model.cross_kv(self.model.encode(src, src_mask))
        logits, present = self.model.decode_step(tgt, [(past_key, past_value)], cross, src_mask)
        return logits, present[0][0], present[0][1]


def inputs(b: int, beams: int, s: int, p: int, t: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, s - 1:] = 0
    kv = (b * beams, 4, p, 32)
    return (torch.randint(3, VOCAB, (b, s), generator=g), mask, torch.randint(3, VOCAB, (b * beams, t), generator=g),
            torch.randn(kv, generator=g), torch.randn(kv, generator=g))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = Seq2SeqTransformer(make_config("tiny", VOCAB, dropout=0.0, n_encoder_layers=1, n_decoder_layers=1)).eval()
    batch, rows, src, past, new = Dim("batch"), Dim("rows"), Dim("src"), Dim("past", min=0), Dim("new")
    shapes = ({0: batch, 1: src}, {0: batch, 1: src}, {0: rows, 1: new}, {0: rows, 2: past}, {0: rows, 2: past})
    path = tmp_path_factory.mktemp("onnx") / "step.onnx"
    program = torch.onnx.export(EncodeAndStep(model), inputs(2, 3, 5, 4, 2), dynamic_shapes=shapes, dynamo=True,
                                input_names=["src", "src_mask", "tgt", "past_key", "past_value"], verbose=False)
    program.save(str(path))
    return EncodeAndStep(model), path


@pytest.mark.parametrize("b, beams, s, p, t", [(2, 3, 5, 4, 1), (1, 1, 3, 0, 1), (3, 2, 6, 0, 3), (2, 4, 7, 6, 2)])
def test_onnx_matches_torch_for_dynamic_shapes(exported, b, beams, s, p, t):
    import onnxruntime as ort

    wrapper, path = exported
    args = inputs(b, beams, s, p, t, seed=b + p)
    names = ["src", "src_mask", "tgt", "past_key", "past_value"]
    got = ort.InferenceSession(str(path)).run(None, {n: a.numpy() for n, a in zip(names, args)})
    with torch.no_grad():
        want = wrapper(*args)
    assert got[0].shape == (b * beams, t, VOCAB) and got[1].shape == (b * beams, 4, p + t, 32)
    for g, w in zip(got, want):
        assert np.abs(g - w.numpy()).max() <= ATOL
