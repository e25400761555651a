"""fp16 / bf16 versions of an fp32 ONNX graph whose inputs and outputs stay fp32.

The ONNX Runtime backend binds every float input and output (past/present K/V, logits) as fp32, so
both conversions keep the graph's IO types: casts are inserted at the edges.

- fp16: onnxruntime.transformers.float16.convert_float_to_float16 (keep_io_types=True); op types in
  `op_block_list` (onnxruntime's default list plus the profile's [precision_fallback] ops) and node
  names in `node_block_list` stay fp32.
- bf16: weights are STORED as bf16 (half the size on disk) and cast to fp32 when the session
  starts; ONNX Runtime's CPU provider has almost no bf16 kernels, so arithmetic stays fp32. Nodes in
  `node_block_list` (or of a blocked op type) keep fp32 weights.
"""
from __future__ import annotations

from typing import Any

import numpy as np

MIN_BF16_ELEMENTS = 16  # smaller initializers (shapes, scalars, norms' eps) are not worth a Cast


def to_fp16(model: Any, op_block_list: tuple[str, ...] = (), node_block_list: tuple[str, ...] = ()) -> Any:
    """An fp16 copy of `model` (ModelProto) with fp32 graph inputs/outputs."""
    import warnings

    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    ops = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(op_block_list))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the float32 value will be truncated" for tiny weights
        model = convert_float_to_float16(model, keep_io_types=True, op_block_list=ops,
                                         node_block_list=list(node_block_list), disable_shape_infer=True)
    join_fp32_islands(model)
    return model


def join_fp32_islands(model: Any) -> int:
    """Remove Cast(fp32->fp16) -> Cast(fp16->fp32) round trips between two fp32 nodes.

    The converter casts every blocked node's output to fp16 and back before the next blocked node,
    so a value above 65504 would still become inf between two fp32 nodes. Returns pairs removed.
    """
    from onnx import TensorProto

    graph = model.graph
    outputs = {o.name for o in graph.output}
    to = {n.name: next((a.i for a in n.attribute if a.name == "to"), None) for n in graph.node if n.op_type == "Cast"}
    narrow = {n.output[0]: n for n in graph.node if n.op_type == "Cast" and to[n.name] == TensorProto.FLOAT16}
    removed = 0
    for node in [n for n in graph.node if n.op_type == "Cast" and to[n.name] == TensorProto.FLOAT]:
        first = narrow.get(node.input[0])
        if first is None:
            continue
        removed += 1
        if node.output[0] in outputs:   # a graph output keeps its name: the round trip becomes an Identity
            node.op_type, node.input[0] = "Identity", first.input[0]
            del node.attribute[:]
            continue
        for other in graph.node:
            for i, name in enumerate(other.input):
                if name == node.output[0]:
                    other.input[i] = first.input[0]
        graph.node.remove(node)
    used = {i for n in graph.node for i in n.input} | outputs
    for name, node in narrow.items():
        if name not in used:
            graph.node.remove(node)
    return removed


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 array -> bf16 bit patterns (uint16), rounded to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    out = (rounded >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), out)


def to_bf16(model: Any, op_block_list: tuple[str, ...] = (), node_block_list: tuple[str, ...] = ()) -> Any:
    """`model` with its float weights stored as bf16 and a Cast to fp32 in front of each use."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    blocked = {i for n in graph.node if n.op_type in op_block_list or n.name in node_block_list for i in n.input}
    casts = []
    for init in list(graph.initializer):
        if init.data_type != TensorProto.FLOAT or init.name in blocked:
            continue
        values = numpy_helper.to_array(init)
        if values.size < MIN_BF16_ELEMENTS:
            continue
        stored = helper.make_tensor(f"{init.name}.bf16", TensorProto.BFLOAT16, values.shape,
                                    bf16_bits(values).tobytes(), raw=True)
        graph.initializer.remove(init)
        graph.initializer.append(stored)
        casts.append(helper.make_node("Cast", [stored.name], [init.name], name=f"{init.name}.to_fp32",
                                      to=TensorProto.FLOAT))
    for offset, node in enumerate(casts):
        graph.node.insert(offset, node)
    return model


def convert_float(model: Any, precision: str, op_block_list: tuple[str, ...] = (),
                  node_block_list: tuple[str, ...] = ()) -> Any:
    """fp16 or bf16 as above; `model` may be modified in place."""
    if precision == "fp16":
        return to_fp16(model, op_block_list, node_block_list)
    if precision == "bf16":
        return to_bf16(model, op_block_list, node_block_list)
    raise ValueError(f"convert_float: precision {precision!r} is not fp16 or bf16")
