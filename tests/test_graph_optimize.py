"""deploylm.export.graph_optimize: torch.onnx's own graph optimization without the quadratic SlicesSplit rule."""
from __future__ import annotations

import numpy as np
import onnx
import torch
from torch import nn

from deploylm.export import graph_optimize


class _Block(nn.Module):
    """A little of everything the default rules and the constant folding see in a causal LM's graph."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                          # x [B, T, 8]
        b, t = x.shape[0], x.shape[1]
        h = self.proj(x).view(b, t, 2, 4).transpose(1, 2)                            # [B, 2, T, 4]
        rotated = torch.cat((-h[..., 2:], h[..., :2]), dim=-1)                        # RoPE's rotate_half
        out = (h * 0.5 + rotated).transpose(1, 2).reshape(b, t, 8)                   # [B, T, 8]
        return out.to(torch.float64).to(torch.float32).unsqueeze(0).unsqueeze(0).squeeze(0).squeeze(0)


def _export(optimize: bool):
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=1)
    torch.manual_seed(0)
    module = _Block().eval()
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        program = torch.onnx.export(module, (x,), dynamo=True, dynamic_shapes={"x": {0: batch, 1: seq}},
                                    input_names=["x"], output_names=["y"], optimize=optimize, verbose=False)
    return module, program


def _without_metadata(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph without the exporter's debug annotations (stack traces; the original name of a renamed output)."""
    g = model.graph
    for item in [*g.node, *g.input, *g.output, *g.value_info, *g.initializer]:
        item.ClearField("metadata_props")
    return model


def test_the_graph_is_the_one_torch_onnx_optimizes_to(tmp_path):
    module, theirs = _export(optimize=True)
    _, ours = _export(optimize=False)
    graph_optimize.optimize_exported(ours)
    ours_proto, theirs_proto = ours.model_proto, theirs.model_proto
    assert len(ours_proto.graph.node) < 25, "the optimizer ran"     # unoptimized: dozens of shape nodes
    assert _without_metadata(ours_proto) == _without_metadata(theirs_proto)
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((3, 5, 8)).astype(np.float32)
    path = tmp_path / "ours.onnx"
    onnx.save(ours_proto, str(path))
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, module(torch.from_numpy(x)).detach().numpy(), atol=1e-6)


def test_the_quadratic_rule_is_never_tried_and_the_others_are(monkeypatch):
    from onnxscript.rewriter.rules.common import slice_split_rule, unsqueeze_unsqueeze_rule

    tried: dict[str, int] = {"slice_split": 0, "unsqueeze_unsqueeze": 0}

    def counting(rule, key):
        original = rule.try_rewrite

        def try_rewrite(*args, **kwargs):
            tried[key] += 1
            return original(*args, **kwargs)
        return try_rewrite

    monkeypatch.setattr(slice_split_rule, "try_rewrite", counting(slice_split_rule, "slice_split"))
    monkeypatch.setattr(unsqueeze_unsqueeze_rule, "try_rewrite", counting(unsqueeze_unsqueeze_rule, "unsqueeze_unsqueeze"))
    _, program = _export(optimize=False)
    graph_optimize.optimize_exported(program)
    assert tried == {"slice_split": 0, "unsqueeze_unsqueeze": tried["unsqueeze_unsqueeze"]}
    assert tried["unsqueeze_unsqueeze"] > 0


def test_export_graph_optimizes_with_this_module(monkeypatch, seed_lm_dir, tmp_path):
    from deploylm.export import onnx_export
    from deploylm.models.checkpoint import load_checkpoint

    calls: list[object] = []
    real = onnx_export.optimize_exported
    monkeypatch.setattr(onnx_export, "optimize_exported", lambda program: (calls.append(program), real(program)))
    model, _ = load_checkpoint(seed_lm_dir)
    plan = onnx_export.plan_graphs(model.float().eval())
    for spec, module in plan.graphs:
        onnx_export.export_graph(module, spec, tmp_path, plan.dims.vocab_size)
    assert len(calls) == len(plan.graphs) == 1
    graph = onnx.load(str(tmp_path / plan.graphs[0][0].file), load_external_data=False).graph
    assert not [n for n in graph.node if n.op_type == "Constant"], "constants lifted to initializers, as optimize=True does"


def test_an_onnxscript_without_the_internals_gets_torch_onnxs_own_optimizer(monkeypatch):
    monkeypatch.setattr(graph_optimize, "_passes", lambda: None)

    class Program:
        optimized = 0
        model = object()

        def optimize(self) -> None:
            self.optimized += 1

    program = Program()
    graph_optimize.optimize_exported(program)
    assert program.optimized == 1
