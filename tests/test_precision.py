"""fp16 / bf16 conversion (deploylm.export.precision): graph IO stays fp32 (what the onnx backend
binds), block lists keep nodes in fp32, fp32 islands carry values above the fp16 range, bf16 stores
rounded-to-nearest-even weights."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploylm.export.precision import bf16_bits, convert_float, join_fp32_islands, to_bf16, to_fp16
from tests.helpers.tied_graph import FEEDS, tied_graph


def session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def io_types(model):
    return [v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)]


def init_types(model):
    return {i.name: i.data_type for i in model.graph.initializer}


@pytest.fixture
def fp32(tmp_path):
    return onnx.load(str(tied_graph(tmp_path / "fp32.onnx")))


def test_fp16_keeps_io_types_and_converts_weights(fp32):
    ref = session(fp32).run(None, FEEDS[0])[0]
    model = to_fp16(onnx.ModelProto.FromString(fp32.SerializeToString()))
    assert io_types(model) == io_types(fp32) == [TensorProto.INT64, TensorProto.FLOAT]
    assert init_types(model)["w1"] == TensorProto.FLOAT16
    out = session(model).run(None, FEEDS[0])[0]
    assert out.dtype == np.float32 and np.abs(out - ref).max() <= 1e-2 * np.abs(ref).max()


def test_fp16_block_lists_keep_nodes_fp32(fp32):
    by_op = to_fp16(onnx.ModelProto.FromString(fp32.SerializeToString()), op_block_list=("MatMul",))
    assert init_types(by_op)["w1"] == TensorProto.FLOAT and init_types(by_op)["w2"] == TensorProto.FLOAT
    by_node = to_fp16(onnx.ModelProto.FromString(fp32.SerializeToString()), node_block_list=("fc1",))
    assert init_types(by_node)["w1"] == TensorProto.FLOAT and init_types(by_node)["w2"] == TensorProto.FLOAT16


def _overflow_graph():
    """x -> Mul(1e5) -> Mul(1e-5) -> y: the middle value exceeds 65504, the result does not."""
    nodes = [helper.make_node("Mul", ["x", "big"], ["m"], name="up"),
             helper.make_node("Mul", ["m", "small"], ["y"], name="down")]
    inits = [numpy_helper.from_array(np.array(1e4, np.float32), "big"),
             numpy_helper.from_array(np.array(1e-4, np.float32), "small")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_fp32_island_carries_values_above_the_fp16_range():
    x = {"x": np.array([10.0, 20.0, -30.0, 1.0], np.float32)}      # x * 1e4 > 65504
    plain = to_fp16(_overflow_graph())
    assert init_types(plain)["big"] == TensorProto.FLOAT16           # the whole chain is fp16
    island = to_fp16(_overflow_graph(), node_block_list=("up", "down"))
    down = next(n for n in island.graph.node if n.name == "down")
    up = next(n for n in island.graph.node if n.name == "up")
    assert down.input[0] == up.output[0]                             # no fp32 -> fp16 -> fp32 round trip
    assert init_types(island)["big"] == TensorProto.FLOAT
    np.testing.assert_allclose(session(island).run(None, x)[0], x["x"], rtol=1e-5)


def test_join_fp32_islands_removes_round_trips_only():
    assert join_fp32_islands(_overflow_graph()) == 0                # nothing to join in an fp32 graph
    from onnxruntime.transformers.float16 import convert_float_to_float16

    raw = convert_float_to_float16(_overflow_graph(), keep_io_types=True, node_block_list=["up", "down"])
    assert join_fp32_islands(raw) == 3                              # input, middle and output round trips
    out = session(raw).run(None, {"x": np.array([10.0, 1, 2, 3], np.float32)})[0]
    np.testing.assert_allclose(out, [10.0, 1, 2, 3], rtol=1e-5)


def test_bf16_bits_round_to_nearest_even():
    values = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -2.5, np.nan], np.float32)
    bits = bf16_bits(values)
    assert bits[0] == 0x3F80 and bits[1] == 0x3F80 and bits[2] == 0x3F82   # ties to even
    assert bits[3] == 0xC020 and bits[4] == 0x7FC0


def test_bf16_stores_weights_in_bf16_and_runs(fp32):
    ref = session(fp32).run(None, FEEDS[0])[0]
    model = to_bf16(onnx.ModelProto.FromString(fp32.SerializeToString()), node_block_list=("fc2",))
    types = init_types(model)
    assert types["w1.bf16"] == TensorProto.BFLOAT16 and types["w2"] == TensorProto.FLOAT
    assert io_types(model) == io_types(fp32)
    out = session(model).run(None, FEEDS[0])[0]
    assert np.abs(out - ref).max() <= 2e-2 * np.abs(ref).max()
    assert model.ByteSize() < 0.75 * fp32.ByteSize()


def test_convert_float_refuses_other_precisions(fp32):
    with pytest.raises(ValueError, match="int8"):
        convert_float(fp32, "int8")


def test_bf16_bits_keep_every_nan_a_nan():
    """Rounding adds 0x7FFF: a NaN with only low mantissa bits would carry into the exponent (+inf) and a
    negative NaN with all bits set would wrap around to +0; both must stay NaN."""
    values = np.array([0x7F800001, 0xFFFFFFFF, 0x7FFFFFFF], np.uint32).view(np.float32)
    assert bf16_bits(values).tolist() == [0x7FC0] * 3
    assert bf16_bits(np.array([np.inf, -np.inf, 3.0e38], np.float32)).tolist() == [0x7F80, 0xFF80, 0x7F62]


def test_bf16_leaves_initializers_below_16_elements_in_fp32():
    from onnx import helper, numpy_helper

    nodes = [helper.make_node("Add", ["x", "small"], ["h"], name="a"), helper.make_node("Add", ["h", "big"], ["y"], name="b")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16])],
                              [numpy_helper.from_array(np.ones(15, np.float32), "small"),
                               numpy_helper.from_array(np.ones(16, np.float32), "big")])
    types = init_types(to_bf16(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)))
    assert types == {"small": TensorProto.FLOAT, "big.bf16": TensorProto.BFLOAT16}


def test_fp16_blocked_graph_edges_carry_values_above_the_fp16_range():
    """keep_io_types casts a graph input to fp16 and back before a blocked first node, and a blocked last
    node's output to fp16 and back: to_fp16 joins those round trips too, so a value above 65504 (or one
    fp16 cannot hold exactly) passes a graph kept in fp32 unchanged, as fp32 logits from an fp32 lm_head."""
    x = {"x": np.array([7e4, 1.0001, -3.3e5, 1.0], np.float32)}
    island = to_fp16(_overflow_graph(), node_block_list=("up", "down"))
    np.testing.assert_allclose(session(island).run(None, x)[0], x["x"], rtol=1e-5)


def test_fp16_keeps_onnxruntimes_default_blocked_ops_beside_the_profiles():
    """The profile's op_block_list adds to onnxruntime's default list, it does not replace it: a CumSum
    (default-blocked: fp16 stops counting past 2048) stays fp32 in the graph, read through a Cast to fp32,
    while the Mul before it is fp16. (ONNX Runtime's CPU provider would cast an fp16 CumSum back to fp32
    itself, so only the graph shows it; a GPU runs what the graph says.)"""
    nodes = [helper.make_node("Mul", ["x", "w"], ["m"], name="scale"),
             helper.make_node("CumSum", ["m", "axis"], ["y"], name="cumsum")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4096])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4096])],
                              [numpy_helper.from_array(np.ones(4096, np.float32), "w"),
                               numpy_helper.from_array(np.array(1, np.int64), "axis")],
                              value_info=[helper.make_tensor_value_info("m", TensorProto.FLOAT, [1, 4096])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)   # typed as exported
    converted = to_fp16(model, op_block_list=("Relu",))
    assert init_types(converted)["w"] == TensorProto.FLOAT16                    # the Mul is fp16
    producers = {o: n for n in converted.graph.node for o in n.output}
    cumsum = next(n for n in converted.graph.node if n.op_type == "CumSum")
    cast = producers[cumsum.input[0]]
    assert cast.op_type == "Cast" and cast.attribute[0].i == TensorProto.FLOAT
    y = session(converted).run(None, {"x": np.ones((1, 4096), np.float32)})[0]
    np.testing.assert_array_equal(y[0], np.arange(1, 4097, dtype=np.float32))
