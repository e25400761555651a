"""4-bit weights on the Q4_1 grid (per block: w = d*q + m, q in 0..15) on onnxruntime's fast kernel.

GGUF's Q4_1 stores every block of 32 input-dim weights as a scale d and a float minimum m. SmolLM2's
GGUF weights are exactly that, so the fp32 export's MatMul weights lie on such a grid. onnxruntime's
MatMulNBits can hold a float block offset only as an HQQ-style float zero point, and with one it
dequantizes the weights to fp32 on every call (0.29x fp32 speed on SmolLM2); integer zero points
(RTN asymmetric) cannot land on m (+19% perplexity). So the offset is split off:

    X @ W = X @ (d * (q - 8))  +  blocksum(X) @ C,      C[b, n] = m[b, n] + 8 d[b, n]

- `X @ (d*(q - 8))`: symmetric 4-bit MatMulNBits, quantized by onnxruntime's own MatMulNBitsQuantizer
  (symmetric RTN divides the block's largest magnitude, -8d at q = 0, by -8: scale d, and lands on
  q - 8 exactly, since q = 0 and q = 15 both occur in a Q4_1 block), run at `accuracy_level` 4:
  the int8-activation kernel;
- `blocksum(X) @ C`: blocksum(X) = X @ E with E [K, K/block] the 0/1 block indicator (once per
  distinct input), C [K/block, N] fp32, then Add.
MatMuls reading the same input (q/k/v, gate/up) are fused: one MatMulNBits over their weights side
by side, one offset MatMul, one Add, then Split back into their outputs.

On weights that are not on a Q4_1 grid the same code is plain min/max asymmetric 4-bit with float
offsets (d = (max - min)/15, m = min per block), i.e. GGUF's own Q4_1 quantization.
Storage per weight: 4 bits + a fp32 scale and a fp32 offset per block (0.75 bytes at block 32).
"""
from __future__ import annotations

from typing import Any

import numpy as np

OFFSET_SUFFIX = ".q4_1_offset"


def q4_1_fit(weight: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(centred weight d*(q-8) [K, N], offsets C = m + 8d [K/block, N]) of a [K, N] MatMul weight.

    Blocks run along K (the input dim); a last partial block is padded with copies of its last row
    (which moves neither its minimum nor its maximum) and the padding is cut off again.
    """
    k, n = weight.shape
    kb = -(-k // block_size)
    padded = np.pad(weight, ((0, kb * block_size - k), (0, 0)), mode="edge")
    blocks = padded.reshape(kb, block_size, n).astype(np.float64)                     # [Kb, bs, N]
    low, high = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
    d = (high - low) / 15.0
    q = np.clip(np.round((blocks - low) / np.where(d > 0, d, 1.0)), 0, 15)
    centred = d * (q - 8.0)                                                            # [Kb, bs, N]
    offsets = (low + 8.0 * d)[:, 0, :]                                                 # [Kb, N]
    return centred.reshape(kb * block_size, n)[:k].astype(np.float32), offsets.astype(np.float32)


def eligible(model: Any, node: Any) -> bool:
    """A MatMul over a 2-D constant fp32 weight."""
    from onnx import TensorProto

    if node.op_type != "MatMul":
        return False
    init = next((i for i in model.graph.initializer if i.name == node.input[1]), None)
    return init is not None and len(init.dims) == 2 and init.data_type == TensorProto.FLOAT


def split_offsets(model: Any, names: list[str], block_size: int, *, fuse: bool = True) -> list[str]:
    """Rewrite the MatMuls `names` into MatMul(X, d*(q-8)) + MatMul(X @ E, C) in place.

    fuse: MatMuls reading the same input (q/k/v, gate/up) become one MatMul over their weights side
    by side, one offset MatMul and one Add, split back into their outputs (fewer, larger kernels).
    Returns the names of the MatMuls that now carry centred weights (to be quantized 4-bit
    symmetric); the block-sum and offset MatMuls are named with OFFSET_SUFFIX and stay fp32.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    wanted = set(names)
    groups: dict[str, list[Any]] = {}   # input (fuse) or node name -> nodes, in graph order
    for node in graph.node:
        if node.name in wanted and eligible(model, node):
            groups.setdefault(node.input[0] if fuse else node.name, []).append(node)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
    sums: dict[str, str] = {}           # input tensor -> its block sums
    indicators: dict[int, str] = {}     # K -> indicator initializer
    done = []
    for nodes in groups.values():
        x = nodes[0].input[0]
        name = "+".join(n.name for n in nodes)
        fits = [q4_1_fit(numpy_helper.to_array(inits[n.input[1]]), block_size) for n in nodes]
        k = fits[0][0].shape[0]
        graph.initializer.extend([
            numpy_helper.from_array(np.concatenate([c for c, _ in fits], axis=1), f"{name}.q4_1"),
            numpy_helper.from_array(np.concatenate([o for _, o in fits], axis=1), f"{name}{OFFSET_SUFFIX}")])
        new = []
        if k not in indicators:
            eye = np.repeat(np.eye(-(-k // block_size), dtype=np.float32), block_size, axis=0)[:k]  # [K, Kb]
            indicators[k] = f"q4_1.block_sum.{k}x{block_size}"
            graph.initializer.append(numpy_helper.from_array(eye, indicators[k]))
        if x not in sums:
            sums[x] = f"{x}.block_sum{k}"
            new.append(helper.make_node("MatMul", [x, indicators[k]], [sums[x]],
                                        name=f"{name}.block_sum{OFFSET_SUFFIX}"))
        out = nodes[0].output[0] if len(nodes) == 1 else f"{name}.out"
        new += [helper.make_node("MatMul", [x, f"{name}.q4_1"], [f"{name}.centred"], name=name),
                helper.make_node("MatMul", [sums[x], f"{name}{OFFSET_SUFFIX}"], [f"{name}.offset"],
                                 name=f"{name}{OFFSET_SUFFIX}"),
                helper.make_node("Add", [f"{name}.centred", f"{name}.offset"], [out],
                                 name=f"{name}.add{OFFSET_SUFFIX}")]
        if len(nodes) > 1:
            widths = [c.shape[1] for c, _ in fits]
            outputs = [n.output[0] for n in nodes]
            if opset >= 13:
                graph.initializer.append(numpy_helper.from_array(np.array(widths, dtype=np.int64), f"{name}.widths"))
                new.append(helper.make_node("Split", [out, f"{name}.widths"], outputs, name=f"{name}.split", axis=-1))
            else:
                new.append(helper.make_node("Split", [out], outputs, name=f"{name}.split", axis=-1, split=widths))
        index = list(graph.node).index(nodes[0])
        for n in nodes:
            graph.node.remove(n)
        for offset, n in enumerate(new):
            graph.node.insert(index + offset, n)
        done.append(name)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
        for listed in [v for v in graph.input if v.name == init.name]:   # old exports list weights as inputs
            graph.input.remove(listed)
    return done
