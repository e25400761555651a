"""The two attention products of a decode step, written six ways in ONNX Runtime (issue 7, fifth session).

One decode step of the append-layout graph (deploylm/export/hf_graphs.py, `append_attention`) computes, per
layer, scores = q @ Kᵀ (q [R, Hkv, G, Dh], K [R, Hkv, C, Dh]) and out = P @ V (P [R, Hkv, G, C]). At 32
rows they are ~19% of the kernel time of a step (ORT profile), against ~7% of its bytes. This script times
30 layers' worth of each product (30 distinct K or V, so they stream from memory as in the graph),
interleaved, in sessions with the backend's options:

  S a  q @ Kᵀ                         what the graph does now (ORT fuses the Transpose: FusedMatMul transB)
  S b  (K @ qᵀ)ᵀ                      the big operand first (SGEMM's A is not packed), then a Transpose
  S c  K[.., 1, C, Dh] @ q[.., G, Dh, 1]  a broadcast batched product, one column per query head
  O d  P @ V                          what the graph does now
  O e  (Vᵀ @ Pᵀ)ᵀ                     V stored transposed [R, Hkv, Dh, C] (a cache layout change), then a Transpose
  O f  Vᵀ[.., 1, Dh, C] @ P[.., G, C, 1]  broadcast, V stored transposed

`max|diff|` is against a (S) or d (O): 0 means the same bits.

    .venv/bin/python benchmarks/attention_matmul.py [--rows 32] [--past 116] [--runs 25]

What it showed (docs/benchmarks.md, "Issue 7, fifth session"): b and e are bitwise identical to a and d
and 10–25% faster in isolation, c and f change the bits; in the exported graph, b's output Transpose
costs what the product saves (step 47.8 vs 48.3 ms at 32 rows, 26.7 vs 26.4 at 8), so nothing was landed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

HEADS, GROUPS, HEAD_DIM, LAYERS = 3, 3, 64, 30      # SmolLM2-135M: 3 K/V heads, 9 query heads, 30 layers


def _session(nodes, inputs, outputs, initializers=()):
    import onnxruntime as ort
    from onnx import helper

    graph = helper.make_graph(nodes, "attention", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _big_first(small: str, big: str, out: str, inputs, outputs):
    """A session computing, per layer i, (big_i @ smallᵀ)ᵀ -> out_i: the big operand as SGEMM's first
    (unpacked) operand, then a Transpose back to [.., G, ...]."""
    from onnx import helper

    nodes = [helper.make_node("Transpose", [small], [f"{small}t"], perm=[0, 1, 3, 2])]
    for i in range(LAYERS):
        nodes += [helper.make_node("MatMul", [f"{big}{i}", f"{small}t"], [f"{out}t{i}"]),
                  helper.make_node("Transpose", [f"{out}t{i}"], [f"{out}{i}"], perm=[0, 1, 3, 2])]
    return _session(nodes, inputs, outputs)


def _broadcast(small: str, big: str, out: str, column_shape: list[int], out_shape: list[int], inputs, outputs):
    """A session computing, per layer i, big_i[.., 1, :, :] @ small[.., G, :, 1] -> out_i (one column per
    query head, the big operand broadcast over the G heads)."""
    from onnx import TensorProto, helper

    shape = lambda name, dims: helper.make_tensor(name, TensorProto.INT64, [len(dims)], dims)  # noqa: E731
    nodes = [helper.make_node("Reshape", [small, "column_shape"], [f"{small}5"])]
    for i in range(LAYERS):
        nodes += [helper.make_node("Unsqueeze", [f"{big}{i}", "axis2"], [f"{big}5{i}"]),
                  helper.make_node("MatMul", [f"{big}5{i}", f"{small}5"], [f"{out}5{i}"]),
                  helper.make_node("Reshape", [f"{out}5{i}", "out_shape"], [f"{out}{i}"])]
    return _session(nodes, inputs, outputs, [shape("column_shape", column_shape), shape("axis2", [2]),
                                             shape("out_shape", out_shape)])


def variants(rows: int, past: int) -> dict[str, tuple[object, dict[str, np.ndarray]]]:
    """Name -> (session, feeds) for the six formulations; every output i is [R, Hkv, G, C] or [R, Hkv, G, Dh]."""
    from onnx import TensorProto, helper

    R, H, G, C, D, L = rows, HEADS, GROUPS, past, HEAD_DIM, LAYERS
    fp32 = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)  # noqa: E731
    node = helper.make_node
    rng = np.random.default_rng(0)
    keys = {f"k{i}": rng.standard_normal((R, H, C, D), dtype=np.float32) for i in range(L)}
    values = {f"v{i}": rng.standard_normal((R, H, C, D), dtype=np.float32) for i in range(L)}
    values_t = {name: np.ascontiguousarray(v.transpose(0, 1, 3, 2)) for name, v in values.items()}
    q = rng.standard_normal((R, H, G, D), dtype=np.float32)
    p = rng.random((R, H, G, C), dtype=np.float32)
    k_in = [fp32(f"k{i}", [R, H, C, D]) for i in range(L)]
    v_in = [fp32(f"v{i}", [R, H, C, D]) for i in range(L)]
    vt_in = [fp32(f"v{i}", [R, H, D, C]) for i in range(L)]
    outs = lambda prefix: [fp32(f"{prefix}{i}", None) for i in range(L)]  # noqa: E731
    each = lambda make: [n for i in range(L) for n in make(i)]             # noqa: E731
    q_in, p_in = [fp32("q", [R, H, G, D])], [fp32("p", [R, H, G, C])]
    return {
        "S a q@Kt": (_session(each(lambda i: [node("Transpose", [f"k{i}"], [f"kt{i}"], perm=[0, 1, 3, 2]),
                                              node("MatMul", ["q", f"kt{i}"], [f"s{i}"])]),
                              q_in + k_in, outs("s")), dict(q=q, **keys)),
        "S b (K@qt)t": (_big_first("q", "k", "s", q_in + k_in, outs("s")), dict(q=q, **keys)),
        "S c broadcast": (_broadcast("q", "k", "s", [R, H, G, D, 1], [R, H, G, C], q_in + k_in, outs("s")),
                          dict(q=q, **keys)),
        "O d P@V": (_session(each(lambda i: [node("MatMul", ["p", f"v{i}"], [f"o{i}"])]), p_in + v_in, outs("o")),
                    dict(p=p, **values)),
        "O e (Vt@Pt)t": (_big_first("p", "v", "o", p_in + vt_in, outs("o")), dict(p=p, **values_t)),
        "O f broadcast": (_broadcast("p", "v", "o", [R, H, G, C, 1], [R, H, G, D], p_in + vt_in, outs("o")),
                          dict(p=p, **values_t)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--past", type=int, default=116, help="K/V positions C")
    parser.add_argument("--runs", type=int, default=25)
    args = parser.parse_args()
    cases = variants(args.rows, args.past)
    results = {name: session.run(None, feeds) for name, (session, feeds) in cases.items()}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.runs):
        for name, (session, feeds) in cases.items():
            start = time.perf_counter()
            session.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    print(f"rows {args.rows}, past {args.past}, {LAYERS} layers, {args.runs} interleaved runs, "
          f"load average {os.getloadavg()[0]:.1f}")
    for name in cases:
        reference = results["S a q@Kt" if name.startswith("S") else "O d P@V"]
        diff = max(float(np.abs(a - b).max()) for a, b in zip(results[name], reference))
        print(f"  {name:16s} median {statistics.median(times[name]) * 1e3:6.2f} ms   max|diff| {diff:.1e}")


if __name__ == "__main__":
    main()
