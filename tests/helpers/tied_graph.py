"""A small hand-built ONNX graph with a tied lm_head, for the quantization tests (test_quantize, test_rowwise)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

V, D, H = 64, 64, 128


def tied_graph(path):
    """ids [B, T] -> Gather(emb) -> MatMul(w1) -> Relu -> MatMul(w2) -> MatMul(Transpose(emb)) -> logits [B, T, V]."""
    rng = np.random.default_rng(0)
    emb = rng.normal(0, 1, (V, D)).astype(np.float32)
    w1 = rng.normal(0, 0.1, (D, H)).astype(np.float32)
    w2 = rng.normal(0, 0.1, (H, D)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["x"], name="embed"),
             helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
             helper.make_node("Transpose", ["emb"], ["embT"], name="tie", perm=[1, 0]),
             helper.make_node("MatMul", ["y", "embT"], ["logits"], name="lm_head")]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "t"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "t", V])],
                              [numpy_helper.from_array(a, n) for a, n in ((emb, "emb"), (w1, "w1"), (w2, "w2"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.save(model, str(path))
    return path


FEEDS = [{"input_ids": np.arange(i, i + 8, dtype=np.int64).reshape(2, 4) % V} for i in range(4)]


def run(path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, FEEDS[0])[0]
