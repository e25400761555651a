"""MatMuls that read the same activation (q/k/v, gate/up) become one: weights side by side, one MatMul, a Split.

ONNX Runtime's CPU MatMul pays fixed costs per call (dispatch, the thread pool's hand-offs), so small
weights stream slowly: in a SmolLM2 decode step at 8 rows a 576→192 projection (k, v) moves its weights
at ~12 GB/s, a 576→1536 one (gate, up) at ~27 GB/s (`benchmarks/onnx_step.py --profile`). One MatMul over
[W_q | W_k | W_v] computes every output element as the separate ones did: MLAS accumulates each over K
in the same order whatever the width of the weight, so the outputs are the same bits (SmolLM2: max |diff|
0 on the logits and the new K/V at 8 and 32 rows) and the step is faster (1.08× at 8 rows, 1.03× at 32;
docs/benchmarks.md, "Issue 7, fifth session").

`deploylm export` applies it before the graphs are validated against PyTorch, for fp32 profiles and for
int8 weight-only ones (MatMulNBits quantizes each weight column and each activation block along K alike
whatever the width: the same bits again, 1.07× at 8 rows), and for int8 rowwise ones (each row is
quantized once for the whole group, with one smoothing factor per input channel); the other quantized profiles
start from the unpacked graphs (int4 packs the same groups itself: deploylm.export.q4_1), and TensorRT fuses on its own
(deploylm.export.pipeline.packs_matmuls).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

PACKED_SUFFIX = ".packed"


def pack_model(model: Any) -> list[list[str]]:
    """Pack, in place, every set of ≥ 2 MatMuls whose first input is the same tensor and whose second is
    a 2-D fp32 initializer of the same K. Returns the packed groups (original node names, graph order)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers: dict[str, list[Any]] = defaultdict(list)        # activation -> MatMuls reading it with a weight
    for node in graph.node:
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
            weight = inits.get(node.input[1])
            if weight is not None and len(weight.dims) == 2 and weight.data_type == TensorProto.FLOAT:
                readers[node.input[0]].append(node)
    replace: dict[int, list[Any]] = {}
    drop: set[int] = set()
    groups = []
    for x, nodes in readers.items():
        if len(nodes) < 2 or len({inits[n.input[1]].dims[0] for n in nodes}) != 1:
            continue
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]               # each [K, N_i]
        name = nodes[0].name or nodes[0].output[0]
        packed_weight = numpy_helper.from_array(np.ascontiguousarray(np.concatenate(weights, axis=1)),
                                                f"{name}{PACKED_SUFFIX}.weight")          # [K, ΣN_i]
        widths = numpy_helper.from_array(np.array([w.shape[1] for w in weights], np.int64), f"{name}{PACKED_SUFFIX}.widths")
        graph.initializer.extend([packed_weight, widths])
        replace[id(nodes[0])] = [
            helper.make_node("MatMul", [x, packed_weight.name], [f"{name}{PACKED_SUFFIX}"], name=f"{name}{PACKED_SUFFIX}"),
            helper.make_node("Split", [f"{name}{PACKED_SUFFIX}", widths.name], [n.output[0] for n in nodes],
                             name=f"{name}{PACKED_SUFFIX}.split", axis=-1)]
        drop.update(id(n) for n in nodes[1:])
        groups.append([n.name for n in nodes])
    if replace:
        kept = []
        for node in graph.node:   # the packed pair takes the first member's place: x exists there, and
            if id(node) in replace:                              # every member's output is made no later
                kept += replace[id(node)]
            elif id(node) not in drop:
                kept.append(node)
        del graph.node[:]
        graph.node.extend(kept)
        used = {name for node in graph.node for name in node.input}
        unused = [i for i in graph.initializer if i.name not in used]
        for init in unused:
            graph.initializer.remove(init)
    return groups


def pack_graph_file(path: Path) -> list[list[str]]:
    """Pack one graph file in place; weights stay in the graph's external data file if they were there."""
    return rewrite_graph_file(path, pack_model)


def rewrite_graph_file(path: Path, edit: Callable[[Any], Any]) -> Any:
    """Load the graph file `path` with its weights, apply `edit(model)` (in place), and save it back when
    `edit` returns something true: weights external (one data file, onnx_export.save_graph, with the old
    one's permissions) if they were, inline otherwise. Returns what `edit` returned."""
    import onnx

    from deploylm.artifact import external_data_files
    from deploylm.export.onnx_export import save_graph

    path = Path(path)
    external = external_data_files(path)
    model = onnx.load(str(path))                      # weights into memory: the data file is rewritten
    result = edit(model)
    if not result:
        return result
    if external:
        mode = (path.parent / external[0]).stat().st_mode & 0o777
        for data in external:
            (path.parent / data).unlink()
        save_graph(model, path, location=external[0], mode=mode)
    else:
        onnx.save(model, str(path))
    return result
