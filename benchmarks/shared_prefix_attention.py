"""The attention of a beam decode step with each prompt's K/V held once for its beams (issue 7, fifteenth session).

Measured here first; built in the sixteenth session as the shared-prompt KV layout (io_spec.KV_SHARED,
`shared_prompt_attention` in deploylm/export/hf_graphs.py), which exports now default to. The "per-row"
form below is the older append layout.

The append-layout graph (deploylm/export/hf_graphs.py, `append_attention`) keeps K/V per row: at beam 4 the
prompt's positions are held, read and multiplied four times, once per beam, in R·Hkv small products
(q [R, Hkv, G, Dh] against K [R, Hkv, C, Dh]). Beams never leave their prompt, so the prompt's K/V could be
held once per prompt, [P, Hkv, L, Dh], and multiplied by the four beams' queries together (12 query rows per
product instead of 3), with only the generated positions, [R, Hkv, T, Dh], held per row. This script times
the two forms of the whole attention block (scores, scale, mask, softmax, P @ V), 30 layers chained, in
sessions with the backend's options, interleaved:

  per-row        what the graph does now: K/V [R, Hkv, L + T, Dh]
  shared prefix  K/V of the prompt [P, Hkv, L, Dh] + generated K/V [R, Hkv, T, Dh]; the query rows are
                 regrouped by prompt ([R, Hkv, G, Dh] -> [P, Hkv, B·G, Dh]) around the prompt's products,
                 and P @ V is the sum of the prompt's part and the generated part

Rows are prompt-major here (row = prompt · B + beam). The backend keeps rows as slots that beam reorders move
(deploylm/backends/ort_kv.py), but `assign_rows` keeps each prompt's beams within its own block of B physical
rows (a prompt's extra children take the rows of its own dead beams, lowest first), so a real graph could
regroup by prompt with the same Reshape/Transpose as here, without a Gather.

`max|diff|` compares the outputs: the scores are the same bits; P @ V as two sums (prompt, generated) is
not, by a few ulps, as the graph's own split into past and new positions already is.

    .venv/bin/python benchmarks/shared_prefix_attention.py [--prompts 8] [--beams 4] [--prompt-len 33] [--runs 100]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

HEADS, GROUPS, HEAD_DIM, LAYERS = 3, 3, 64, 30      # SmolLM2-135M: 3 K/V heads, 9 query heads, 30 layers


def _session(nodes, inputs, output: str, initializers):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "attention", inputs, [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
                              initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def build(prompts: int, beams: int, shared: bool):
    """One session: q [R, Hkv, G, Dh] goes through 30 attention blocks, each adding its output to q."""
    from onnx import TensorProto, helper, numpy_helper

    rows = prompts * beams
    const = lambda name, values: numpy_helper.from_array(np.asarray(values), name)  # noqa: E731
    initializers = [const("scale", np.float32(HEAD_DIM ** -0.5)), const("axis3", np.array([3], np.int64)),
                    const("zero", np.array([0], np.int64)),
                    const("by_prompt", np.array([prompts, beams, HEADS, GROUPS, HEAD_DIM], np.int64)),   # [P, B, Hkv, G, Dh]
                    const("prompt_rows", np.array([prompts, HEADS, beams * GROUPS, -1], np.int64)),      # [P, Hkv, B·G, *]
                    const("by_head", np.array([prompts, HEADS, beams, GROUPS, -1], np.int64)),           # [P, Hkv, B, G, *]
                    const("beam_rows", np.array([prompts, beams, HEADS, GROUPS, -1], np.int64)),         # [P, B, Hkv, G, *]
                    const("row_shape", np.array([rows, HEADS, GROUPS, -1], np.int64))]                   # [R, Hkv, G, *]
    tensor = lambda name, dims: helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)  # noqa: E731
    inputs = [tensor("q", [rows, HEADS, GROUPS, HEAD_DIM]), tensor("mask", [rows, 1, 1, None])]
    nodes = []
    node = lambda op, ins, out, **kw: nodes.append(helper.make_node(op, ins, [out], **kw))  # noqa: E731
    swap = [0, 2, 1, 3, 4]                      # [P, B, Hkv, ..] <-> [P, Hkv, B, ..]
    q = "q"
    for i in range(LAYERS):
        if shared:
            inputs += [tensor(f"prompt_k{i}", [prompts, HEADS, None, HEAD_DIM]),
                       tensor(f"prompt_v{i}", [prompts, HEADS, None, HEAD_DIM]),
                       tensor(f"gen_k{i}", [rows, HEADS, None, HEAD_DIM]), tensor(f"gen_v{i}", [rows, HEADS, None, HEAD_DIM])]
            node("Reshape", [q, "by_prompt"], f"q5_{i}")
            node("Transpose", [f"q5_{i}"], f"q5t_{i}", perm=swap)
            node("Reshape", [f"q5t_{i}", "prompt_rows"], f"qp_{i}")                        # [P, Hkv, B·G, Dh]
            node("Transpose", [f"prompt_k{i}"], f"pkt_{i}", perm=[0, 1, 3, 2])
            node("MatMul", [f"qp_{i}", f"pkt_{i}"], f"sp_{i}")                              # [P, Hkv, B·G, L]
            node("Reshape", [f"sp_{i}", "by_head"], f"sp5_{i}")
            node("Transpose", [f"sp5_{i}"], f"sp5t_{i}", perm=swap)
            node("Reshape", [f"sp5t_{i}", "row_shape"], f"spr_{i}")                          # [R, Hkv, G, L]
            node("Transpose", [f"gen_k{i}"], f"gkt_{i}", perm=[0, 1, 3, 2])
            node("MatMul", [q, f"gkt_{i}"], f"sg_{i}")                                       # [R, Hkv, G, T]
            node("Concat", [f"spr_{i}", f"sg_{i}"], f"s_{i}", axis=-1)
        else:
            inputs += [tensor(f"k{i}", [rows, HEADS, None, HEAD_DIM]), tensor(f"v{i}", [rows, HEADS, None, HEAD_DIM])]
            node("Transpose", [f"k{i}"], f"kt_{i}", perm=[0, 1, 3, 2])
            node("MatMul", [q, f"kt_{i}"], f"s_{i}")                                         # [R, Hkv, G, L + T]
        node("Mul", [f"s_{i}", "scale"], f"ss_{i}")
        node("Add", [f"ss_{i}", "mask"], f"sm_{i}")
        node("Softmax", [f"sm_{i}"], f"p_{i}", axis=-1)
        if shared:
            node("Shape", [f"prompt_k{i}"], f"L_{i}", start=2, end=3)
            node("Shape", [f"s_{i}"], f"C_{i}", start=3, end=4)
            node("Slice", [f"p_{i}", "zero", f"L_{i}", "axis3"], f"pp_{i}")
            node("Slice", [f"p_{i}", f"L_{i}", f"C_{i}", "axis3"], f"pg_{i}")
            node("Reshape", [f"pp_{i}", "beam_rows"], f"pp5_{i}")
            node("Transpose", [f"pp5_{i}"], f"pp5t_{i}", perm=swap)
            node("Reshape", [f"pp5t_{i}", "prompt_rows"], f"ppp_{i}")                        # [P, Hkv, B·G, L]
            node("MatMul", [f"ppp_{i}", f"prompt_v{i}"], f"op_{i}")                          # [P, Hkv, B·G, Dh]
            node("Reshape", [f"op_{i}", "by_head"], f"op5_{i}")
            node("Transpose", [f"op5_{i}"], f"op5t_{i}", perm=swap)
            node("Reshape", [f"op5t_{i}", "row_shape"], f"opr_{i}")                          # [R, Hkv, G, Dh]
            node("MatMul", [f"pg_{i}", f"gen_v{i}"], f"og_{i}")
            node("Add", [f"opr_{i}", f"og_{i}"], f"o_{i}")
        else:
            node("MatMul", [f"p_{i}", f"v{i}"], f"o_{i}")
        node("Add", [q, f"o_{i}"], f"q_{i}")
        q = f"q_{i}"
    return _session(nodes, inputs, q, initializers)


def feeds(prompts: int, beams: int, prompt_len: int, generated: int, shared: bool, seed: int = 0) -> dict:
    """The same numbers for both forms: per-row K/V are the prompt's repeated over its beams + generated ones."""
    rng = np.random.default_rng(seed)
    rows = prompts * beams
    normal = lambda *shape: rng.standard_normal(shape, np.float32)  # noqa: E731
    out = {"q": normal(rows, HEADS, GROUPS, HEAD_DIM), "mask": np.zeros((rows, 1, 1, prompt_len + generated), np.float32)}
    for i in range(LAYERS):
        pk, pv = normal(prompts, HEADS, prompt_len, HEAD_DIM), normal(prompts, HEADS, prompt_len, HEAD_DIM)
        gk, gv = normal(rows, HEADS, generated, HEAD_DIM), normal(rows, HEADS, generated, HEAD_DIM)
        if shared:
            out.update({f"prompt_k{i}": pk, f"prompt_v{i}": pv, f"gen_k{i}": gk, f"gen_v{i}": gv})
        else:
            out[f"k{i}"] = np.concatenate([np.repeat(pk, beams, 0), gk], 2)
            out[f"v{i}"] = np.concatenate([np.repeat(pv, beams, 0), gv], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=33, help="prompt positions L (the bench prompts: 13-53)")
    parser.add_argument("--generated", default="0,16,32,48,63", help="generated positions T, comma-separated")
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    per_row, shared = build(args.prompts, args.beams, False), build(args.prompts, args.beams, True)
    saved = []
    for generated in (int(t) for t in args.generated.split(",")):
        a = feeds(args.prompts, args.beams, args.prompt_len, generated, False)
        b = feeds(args.prompts, args.beams, args.prompt_len, generated, True)
        ya, yb = per_row.run(None, a)[0], shared.run(None, b)[0]
        ta, tb = [], []
        for _ in range(args.runs):
            start = time.perf_counter(); per_row.run(None, a); ta.append(time.perf_counter() - start)
            start = time.perf_counter(); shared.run(None, b); tb.append(time.perf_counter() - start)
        ma, mb = statistics.median(ta) * 1e3, statistics.median(tb) * 1e3
        saved.append(ma - mb)
        print(f"L={args.prompt_len} T={generated:3d}: per-row {ma:6.2f} ms (min {min(ta) * 1e3:6.2f}), shared prefix "
              f"{mb:6.2f} ms (min {min(tb) * 1e3:6.2f}); paired ratio {statistics.median(x / y for x, y in zip(ta, tb)):.2f}x; "
              f"max|diff| {np.abs(ya - yb).max():.1e} (outputs up to {np.abs(ya).max():.1f})")
    print(f"mean saving over these steps: {statistics.mean(saved):.2f} ms per step ({LAYERS} layers)")


if __name__ == "__main__":
    main()
