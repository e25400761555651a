"""The exporter's graph optimization, without its one quadratic rewrite rule.

`torch.onnx.export(optimize=True)` runs onnxscript's `optimize_ir` (constant folding, the default rewrite
rules, dead-node removal, constant lifting, deduplication, common subexpressions) and then its ONNX fusions.
One of the default rules, `SlicesSplit` (two Slices of one tensor -> one Split), has a two-node pattern, which
onnxscript's matcher looks for by scanning the whole graph from every node: on SmolLM2's 6,355-node graph it
took 27 of the optimizer's 45 s (the export took 162 s), and it rewrote nothing. It fires only when a tensor's
last axis has a static size that two constant Slices halve exactly; a graph deploylm exports has dynamic
sequence axes and slices (RoPE halves) whose ends the exporter writes as INT64_MAX, so it found nothing on any
of them (tests/test_graph_optimize.py checks that the graphs come out the same as torch.onnx's own optimizer).

`optimize_exported` runs the same passes in the same order with the same settings as onnxscript's `optimize_ir`
(and `onnx_fusions.fuse` after it, as torch's `optimize()` does) with every default rule but that one. It uses
onnxscript's internals (the default rule list and the constant-folding pass); where a version lacks them it
runs torch.onnx's own optimization instead, slower but the same graphs.
"""
from __future__ import annotations

from typing import Any


def _passes() -> Any | None:
    """onnxscript's optimize_ir pipeline without SlicesSplit, or None where this onnxscript lacks a part of it."""
    try:
        import onnx_ir as ir
        import onnx_ir.passes.common as common_passes
        from onnxscript import rewriter
        from onnxscript.optimizer import _constant_folding
        from onnxscript.rewriter.rules.common import slice_split_rule
        default_rules = rewriter._DEFAULT_REWRITE_RULES
    except (ImportError, AttributeError):
        return None
    rules = tuple(rule for rule in default_rules if rule is not slice_split_rule)
    return ir.passes.Sequential(
        common_passes.InlinePass(),
        ir.passes.PassManager(
            [
                _constant_folding.FoldConstantsPass(
                    shape_inference=True,
                    input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                    output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                ),
                rewriter.RewritePass(rules),
                common_passes.RemoveUnusedNodesPass(),
                common_passes.RemoveUnusedFunctionsPass(),
                common_passes.RemoveUnusedOpsetsPass(),
            ],
            steps=2,
            early_stop=True,
        ),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.LiftSubgraphInitializersToMainGraphPass(),
        common_passes.DeduplicateInitializersPass(),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.OutputFixPass(),
        common_passes.NameFixPass(),
    )


def optimize_exported(program: Any) -> None:
    """Optimize a `torch.onnx.export(..., optimize=False)` program's graph in place, as `optimize=True` would."""
    passes = _passes()
    if passes is None:
        program.optimize()
        return
    try:
        from onnxscript.rewriter import onnx_fusions
    except ImportError:
        program.optimize()
        return
    passes(program.model)
    onnx_fusions.fuse(program.model)
