"""ONNX quantization (deploylm.export.quantize) on a small hand-built graph with a tied lm_head:
every method writes the ops it promises, stays close to fp32, honours exclusions and leaves
nothing in the working directory."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploylm.errors import UsageError
from deploylm.export.quantize import FeedReader, quantize_graph, scratch_cwd, untie_lm_head
from deploylm.profiles import Quantization

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
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(path))
    return path


FEEDS = [{"input_ids": np.arange(i, i + 8, dtype=np.int64).reshape(2, 4) % V} for i in range(4)]


def run(path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, FEEDS[0])[0]


def ops(path):
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.fixture
def fp32(tmp_path):
    return tied_graph(tmp_path / "fp32.onnx")


CASES = {
    "int8 dynamic": ("int8", Quantization("dynamic", weight_type="quint8", per_channel=True, reduce_range=False),
                     {"DynamicQuantizeLinear"}, 0.15),
    "int8 static": ("int8", Quantization("static", weight_type="qint8", per_channel=True, reduce_range=True,
                                         calibration_samples=4, calibration_method="minmax"),
                    {"QuantizeLinear", "DequantizeLinear"}, 0.25),
    "int8 weight-only": ("int8", Quantization("weight-only", block_size=32, accuracy_level=4, algorithm="rtn",
                                              symmetric=True, embedding=True), {"MatMulNBits"}, 0.05),
    "int4 rtn": ("int4", Quantization("weight-only", block_size=32, accuracy_level=0, algorithm="rtn",
                                      symmetric=False, embedding=True), {"MatMulNBits", "Cast"}, 0.5),
    "int4 hqq": ("int4", Quantization("weight-only", block_size=32, accuracy_level=0, algorithm="hqq",
                                      embedding=False), {"MatMulNBits"}, 0.5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_methods_write_their_ops_and_stay_close(case, fp32, tmp_path):
    precision, q, want_ops, rel = CASES[case]
    before = sorted(os.listdir("."))
    out = tmp_path / "q.onnx"
    quantize_graph(fp32, out, precision, q, feeds=FEEDS)
    assert sorted(os.listdir(".")) == before and os.getcwd() == str(os.path.abspath("."))  # nothing left in cwd
    assert want_ops <= ops(out), ops(out)
    ref, got = run(fp32), run(out)
    assert np.abs(got - ref).max() <= rel * np.abs(ref).max()
    assert out.stat().st_size < fp32.stat().st_size


def test_weight_only_quantizes_the_tied_lm_head_and_embedding(fp32, tmp_path):
    out = tmp_path / "q.onnx"
    quantize_graph(fp32, out, "int8", CASES["int8 weight-only"][1])
    model = onnx.load(str(out))
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 3   # fc1, fc2 and the lm_head
    assert "emb" not in {i.name for i in model.graph.initializer}         # int8 table + row scales instead
    assert out.stat().st_size < 0.45 * fp32.stat().st_size


def test_int4_keeps_the_lm_head_at_8_bits(fp32, tmp_path):
    out = tmp_path / "q.onnx"
    quantize_graph(fp32, out, "int4", CASES["int4 hqq"][1])
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits")
            for n in onnx.load(str(out)).graph.node if n.op_type == "MatMulNBits"}
    assert sorted(bits.values()) == [4, 4, 8] and [n for n, b in bits.items() if b == 8][0].startswith("lm_head")


def test_excluded_nodes_stay_fp32(fp32, tmp_path):
    out = tmp_path / "q.onnx"
    quantize_graph(fp32, out, "int4", CASES["int4 hqq"][1], exclude=("fc1",))
    model = onnx.load(str(out))
    assert [n.name for n in model.graph.node if n.op_type == "MatMul"] == ["fc1"]


def test_untie_gives_the_lm_head_its_own_weight(fp32):
    model = onnx.load(str(fp32))
    assert untie_lm_head(model) == 1
    head = next(n for n in model.graph.node if n.name == "lm_head")
    assert head.input[1] == "emb.untied_T" and "Transpose" not in {n.op_type for n in model.graph.node}
    weight = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "emb.untied_T"))
    assert weight.shape == (D, V)


def test_hqq_is_refused_at_8_bits(fp32, tmp_path):
    q = Quantization("weight-only", block_size=32, accuracy_level=0, algorithm="hqq")
    with pytest.raises(UsageError, match="hqq.*4-bit only"):
        quantize_graph(fp32, tmp_path / "q.onnx", "int8", q)


def test_static_without_calibration_is_a_usage_error(fp32, tmp_path):
    with pytest.raises(UsageError, match="calibration"):
        quantize_graph(fp32, tmp_path / "q.onnx", "int8", CASES["int8 static"][1], feeds=[])
    assert not (tmp_path / "q.onnx").exists()


def test_int4_embedding_blocks_are_available(fp32):
    from deploylm.export.quantize import quantize_embedding

    model = quantize_embedding(onnx.load(str(fp32)), 4, 32)
    assert "GatherBlockQuantized" in {n.op_type for n in model.graph.node}


def test_scratch_cwd_restores_the_working_directory():
    before = os.getcwd()
    with pytest.raises(RuntimeError):
        with scratch_cwd() as tmp:
            assert os.getcwd() == str(tmp.resolve()) or os.path.samefile(os.getcwd(), tmp)
            (tmp / "junk.txt").write_text("x")
            raise RuntimeError("boom")
    assert os.getcwd() == before and not tmp.exists()


def test_feed_reader_rewinds():
    reader = FeedReader(FEEDS[:2])
    assert reader.get_next() is FEEDS[0] and reader.get_next() is FEEDS[1] and reader.get_next() is None
    reader.rewind()
    assert reader.get_next() is FEEDS[0]


@pytest.mark.parametrize("case", list(CASES))
def test_relative_output_paths_land_where_asked(case, fp32, tmp_path, monkeypatch):
    """`deploylm export --out export/x` passes relative paths; the quantizers' scratch cwd must not move them."""
    precision, q, _, _ = CASES[case]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    quantize_graph(fp32, Path("sub/q.onnx"), precision, q, feeds=FEEDS)
    assert (tmp_path / "sub" / "q.onnx").is_file()
