"""Parity-guided fp32 fallback: which nodes to keep in fp32 so a profile meets its checks.

[precision_fallback] `ops` and `nodes` are always kept in fp32 (fp16/bf16: not converted;
int8/int4: not quantized). With `auto = true`, when the converted graphs miss the profile's
[parity] tolerances or [quality] budget (judged on decoding outputs against the fp32 graphs), the
nodes are ranked by sensitivity on calibration inputs and the smallest prefix of that ranking
that passes is searched (doubling, then bisection):

    sensitivity(node) = max(local error, range)
    local error = relative error of the node's output vs fp32 minus that of its inputs (error the
                  node adds; inf when it turns finite inputs into NaN/inf)
    range       = max |value| in and out of the node in the fp32 run / 65504 (fp16 only: > 1
                  overflows)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

FP16_MAX = 65504.0
Exclusions = dict[str, tuple[str, ...]]  # graph file -> node names kept in fp32


@dataclass(frozen=True)
class Verdict:
    """One converted candidate, judged."""

    kept: Exclusions
    failures: tuple[str, ...]   # parity + quality budget failures; empty = passed
    quality: Any                # deploylm.export.quality.QualityReport

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def kept_count(self) -> int:
        return sum(len(v) for v in self.kept.values())


@dataclass(frozen=True)
class SearchResult:
    first: Verdict              # listed ops/nodes only
    final: Verdict              # what was chosen
    attempts: int
    ranked: int                 # nodes the ranking offered


def listed_nodes(model: Any, ops: tuple[str, ...], nodes: tuple[str, ...]) -> tuple[str, ...]:
    """Names of nodes of `ops` types plus `nodes` present in `model`."""
    names = {n.name for n in model.graph.node}
    return tuple(n.name for n in model.graph.node if n.op_type in ops) + tuple(n for n in nodes if n in names)


def run_all_outputs(model: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every float tensor a node produces, for one feed dict (outputs exposed without types)."""
    import onnx
    import onnxruntime as ort

    model = onnx.ModelProto.FromString(model.SerializeToString())
    have = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for name in node.output:
            if name and name not in have:
                model.graph.output.append(onnx.ValueInfoProto(name=name))
                have.add(name)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    values = session.run(None, {k: v for k, v in feeds.items() if k in wanted})
    return {o.name: v.astype(np.float32) for o, v in zip(session.get_outputs(), values)
            if np.issubdtype(v.dtype, np.floating)}


def _rel_err(ref: np.ndarray, cand: np.ndarray | None) -> float:
    if cand is None or cand.shape != ref.shape:
        return 0.0
    if not np.isfinite(cand).all():
        return math.inf if np.isfinite(ref).all() else 0.0
    return float(np.abs(cand - ref).max(initial=0.0) / (np.abs(ref).max(initial=0.0) + 1e-6))


def sensitivity(ref_model: Any, cand_model: Any, feeds: dict[str, np.ndarray], precision: str,
                candidates: set[str]) -> list[tuple[str, float]]:
    """(node name, score) for every `candidates` node of ref_model, most sensitive first (score >= 0)."""
    from onnx import numpy_helper

    ref = run_all_outputs(ref_model, feeds)
    cand = run_all_outputs(cand_model, feeds)
    weights = {i.name: numpy_helper.to_array(i) for i in ref_model.graph.initializer} if precision == "fp16" else {}
    scores = []
    for node in ref_model.graph.node:
        if node.name not in candidates:
            continue
        outs = [o for o in node.output if o in ref]
        e_out = max((_rel_err(ref[o], cand.get(o)) for o in outs), default=0.0)
        e_in = max((_rel_err(ref[i], cand.get(i)) for i in node.input if i in ref), default=0.0)
        local = math.inf if math.isinf(e_out) and not math.isinf(e_in) else max(0.0, e_out - e_in)
        score = local if math.isfinite(local) else 1e30
        if precision == "fp16":
            tensors = [ref[t] for t in (*node.input, *node.output) if t in ref] + \
                      [weights[t] for t in node.input if t in weights and weights[t].dtype == np.float32]
            peak = max((float(np.abs(t).max(initial=0.0)) for t in tensors if t.size), default=0.0)
            score = max(score, peak / FP16_MAX)
        scores.append((node.name, score))
    return sorted(scores, key=lambda item: -item[1])


def search(ranked: list[tuple[str, str]], base: Exclusions, judge: Callable[[Exclusions], Verdict],
           first: Verdict) -> SearchResult:
    """Smallest passing prefix of `ranked` ((file, node) pairs): k = 1, 2, 4, ... then bisection."""
    def with_prefix(k: int) -> Exclusions:
        kept = {f: list(v) for f, v in base.items()}
        for file, node in ranked[:k]:
            kept.setdefault(file, [])
            if node not in kept[file]:
                kept[file].append(node)
        return {f: tuple(v) for f, v in kept.items()}

    attempts, lo, best = 1, 0, None
    k = 1
    while k <= len(ranked):
        verdict = judge(with_prefix(k))
        attempts += 1
        if verdict.passed:
            best = (k, verdict)
            break
        lo = k
        k = len(ranked) if k * 2 > len(ranked) and k < len(ranked) else k * 2
        if k == lo:
            break
    if best is None:   # nothing passes: keep only the listed nodes rather than the most expensive set
        return SearchResult(first, first, attempts, len(ranked))
    hi, chosen = best
    while hi - lo > 1:
        mid = (lo + hi) // 2
        verdict = judge(with_prefix(mid))
        attempts += 1
        if verdict.passed:
            hi, chosen = mid, verdict
        else:
            lo = mid
    return SearchResult(first, chosen, attempts, len(ranked))


def rank_nodes(ref_dir: Path, cand_dir: Path, feeds: dict[str, list[dict]], precision: str,
               base: Exclusions, gathers: bool = True) -> list[tuple[str, str]]:
    """(file, node) pairs over every graph, most sensitive first, leaving out `base` nodes; int8/int4 rank the
    embedding Gathers only with `gathers` (weight-only and rowwise with `embedding = true`: no other method
    quantizes them)."""
    import onnx

    ranked: list[tuple[float, str, str]] = []
    for file, batches in feeds.items():
        ref_model, cand_model = onnx.load(str(ref_dir / file)), onnx.load(str(cand_dir / file))
        changed = {n.name for n in ref_model.graph.node if n.name not in base.get(file, ())}
        if precision in ("int8", "int4"):  # only nodes over constant weights are quantized
            changed &= quantizable_nodes(ref_model, gathers)
        for node, score in sensitivity(ref_model, cand_model, batches[0], precision, changed):
            # int8/int4: every quantized node is a candidate, those whose error did not grow last, so
            # the longest prefix keeps them all in fp32; fp16: nodes with an error or a range to rank
            if score > 0 or precision in ("int8", "int4"):
                ranked.append((score, file, node))
    ranked.sort(key=lambda item: -item[0])
    return [(file, node) for _, file, node in ranked]


def quantizable_nodes(model: Any, gathers: bool = True) -> set[str]:
    """MatMul and Gemm (and with `gathers`, Gather) nodes whose weight is a constant (or a Transpose of one: a tied
    lm_head); the quantizers see a Gemm as a MatMul (deploylm.export.quantize.gemm_to_matmul)."""
    inits = {i.name for i in model.graph.initializer}
    transposed = {o for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in inits for o in n.output}
    weight = {"MatMul": 1, "Gemm": 1, "Gather": 0} if gathers else {"MatMul": 1, "Gemm": 1}
    return {n.name for n in model.graph.node if n.op_type in weight
            and (n.input[weight[n.op_type]] in inits or n.input[weight[n.op_type]] in transposed)}
