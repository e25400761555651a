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
from deploylm.export.quantize import FeedReader, gemm_to_matmul, quantize_graph, scratch_cwd, untie_lm_head
from deploylm.export.rowwise import cpu_has_vnni
from deploylm.profiles import Quantization
from tests.helpers.tied_graph import FEEDS, D, H, V, run, tied_graph


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
    # 7-bit weights where onnxruntime's uint8 x int8 sums saturate (x86 without VNNI): closeness holds everywhere
    "int8 rowwise": ("int8", Quantization("rowwise", smooth_alpha=0.5, calibration_samples=4,
                                          reduce_range=cpu_has_vnni() is False,
                                          embedding=True), {"MatMulInteger", "QuantizeLinear"}, 0.05),
    "int8 weight-only": ("int8", Quantization("weight-only", block_size=32, accuracy_level=4, algorithm="rtn",
                                              symmetric=True, embedding=True), {"MatMulNBits"}, 0.05),
    "int4 rtn": ("int4", Quantization("weight-only", block_size=32, accuracy_level=0, algorithm="rtn",
                                      symmetric=False, embedding=True), {"MatMulNBits", "Cast"}, 0.5),
    "int4 hqq": ("int4", Quantization("weight-only", block_size=32, accuracy_level=0, algorithm="hqq",
                                      embedding=False), {"MatMulNBits"}, 0.5),
    "int4 q4_1": ("int4", Quantization("weight-only", block_size=32, accuracy_level=4, algorithm="q4_1",
                                       embedding=True), {"MatMulNBits", "Cast"}, 0.5),
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


def gemm_graph(path):
    """x [N, D] -> Gemm(x, w1, b1) -> Relu -> Gemm(r, w2ᵀ, b2, transB=1) -> y [N, D]: GPT-2's Conv1D layers
    (torch.addmm) export as Gemm."""
    rng = np.random.default_rng(1)
    w1 = rng.normal(0, 0.1, (D, H)).astype(np.float32)
    w2t = rng.normal(0, 0.1, (D, H)).astype(np.float32)            # [out, in]: read with transB = 1
    b1, b2 = (rng.normal(0, 0.1, n).astype(np.float32) for n in (H, D))
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="c_fc"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2t", "b2"], ["y"], name="c_proj", transB=1)]
    graph = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", D])],
                              [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2t, "w2t"), (b1, "b1"),
                                                                          (b2, "b2"))])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))
    return path


@pytest.mark.parametrize("case", ["int8 weight-only", "int4 rtn", "int8 dynamic", "int8 static"])
def test_gemm_layers_are_quantized_like_matmuls(case, tmp_path):
    """GPT-2's layers are Gemm nodes, which the quantizers (MatMul only) skipped: its int8/int4 artifacts kept every
    layer in fp32 and still said "0 node(s) kept in fp32"."""
    precision, q, want_ops, rel = CASES[case]
    fp32, out = gemm_graph(tmp_path / "gemm.onnx"), tmp_path / "q.onnx"
    feeds = [{"x": np.random.default_rng(i).normal(0, 1, (4, D)).astype(np.float32)} for i in range(4)]
    quantize_graph(fp32, out, precision, q, feeds=feeds)
    assert "Gemm" not in ops(out) and want_ops - {"Cast"} <= ops(out), ops(out)   # Cast: the embedding's; none here
    ref, got = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds[0])[0]
                for p in (fp32, out))
    assert np.abs(got - ref).max() <= rel * np.abs(ref).max()
    assert out.stat().st_size < 0.7 * fp32.stat().st_size


def test_gemm_to_matmul_keeps_names_outputs_and_the_kept_nodes(tmp_path):
    """The MatMul keeps the Gemm's name (what [precision_fallback] nodes and the fallback search name) and the
    Add writes the Gemm's output (what the search compares); a kept Gemm stays as it is."""
    from deploylm.export.fallback import quantizable_nodes

    model = onnx.load(str(gemm_graph(tmp_path / "gemm.onnx")))
    assert quantizable_nodes(model) == {"c_fc", "c_proj"}
    assert gemm_to_matmul(model, keep=("c_fc",)) == 1
    assert [(n.op_type, n.name, list(n.output)) for n in model.graph.node] == [
        ("Gemm", "c_fc", ["h"]), ("Relu", "relu", ["r"]), ("MatMul", "c_proj", ["y.matmul"]),
        ("Add", "c_proj.bias", ["y"])]
    assert "w2t" not in {i.name for i in model.graph.initializer}        # only its transposed copy is left
    feeds = {"x": np.random.default_rng(0).normal(0, 1, (3, D)).astype(np.float32)}
    ref = ort.InferenceSession(str(tmp_path / "gemm.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_untie_gives_the_lm_head_its_own_weight(fp32):
    model = onnx.load(str(fp32))
    assert untie_lm_head(model) == 1
    head = next(n for n in model.graph.node if n.name == "lm_head")
    assert head.input[1] == "emb.untied_T" and "Transpose" not in {n.op_type for n in model.graph.node}
    weight = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "emb.untied_T"))
    assert weight.shape == (D, V)


def test_an_lm_head_kept_in_fp32_shares_the_embedding_in_int8_dynamic(fp32, tmp_path):
    """int8-dynamic with the lm_head kept fp32 (SmolLM2's auto search keeps every MatMul): no untied copy
    of the embedding table next to it (the artifact was 121% of the fp32 one's size)."""
    precision, q, want_ops, rel = CASES["int8 dynamic"]
    out = tmp_path / "q.onnx"
    quantize_graph(fp32, out, precision, q, exclude=("lm_head",))
    model = onnx.load(str(out))
    assert "emb.untied_T" not in {i.name for i in model.graph.initializer}
    assert want_ops <= ops(out)                                   # the other MatMuls are quantized
    ref, got = run(fp32), run(out)
    assert np.abs(got - ref).max() <= rel * np.abs(ref).max()


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


# --- int4 q4_1: GGUF's Q4_1 grid as symmetric 4-bit MatMulNBits + fp32 block offsets -----------------

Q41 = Quantization("weight-only", block_size=32, accuracy_level=0, algorithm="q4_1", embedding=False)


def q4_1_weight(rng, k, n, block=32):
    """A [k, n] weight on a Q4_1 grid (w = d*q + m per block of `block` along k; q = 0 and 15 occur)."""
    kb = -(-k // block)
    q = rng.integers(0, 16, (kb, block, n)).astype(np.float32)
    q[:, 0, :], q[:, 1, :] = 0, 15
    d = rng.uniform(0.005, 0.05, (kb, 1, n)).astype(np.float32)
    m = rng.uniform(-0.4, 0.1, (kb, 1, n)).astype(np.float32)
    return (d * q + m).reshape(kb * block, n)[:k]


def mlp_graph(path, w1, w2):
    """x [B, T, D] -> MatMul(w1) -> Relu -> MatMul(w2) -> Identity -> y (no MatMul writes the output:
    no lm_head, so every MatMul gets the profile's own 4-bit treatment)."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["z"], name="fc2"),
             helper.make_node("Identity", ["z"], ["y"], name="out")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", w1.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", w2.shape[1]])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))
    return path


def run_x(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("k", [64, 80])   # 80: a last partial block
def test_q4_1_fit_is_exact_on_q4_1_weights(k):
    from deploylm.export.q4_1 import q4_1_fit

    w = q4_1_weight(np.random.default_rng(1), k, 24)
    centred, offsets = q4_1_fit(w, 32)
    rebuilt = centred + np.repeat(offsets, 32, axis=0)[:k]
    assert np.abs(rebuilt - w).max() <= 1e-6 * np.abs(w).max()
    scale = (np.abs(centred[:32]).max(axis=0) / 8.0)                     # d of the first block: q - 8 in -8..7
    assert np.allclose(np.round(centred[:32] / scale), centred[:32] / scale, atol=1e-4)


def test_q4_1_matches_fp32_on_q4_1_weights_where_integer_zero_points_do_not(tmp_path):
    rng = np.random.default_rng(2)
    src = mlp_graph(tmp_path / "fp32.onnx", q4_1_weight(rng, 64, 96), q4_1_weight(rng, 96, 40))
    x = rng.normal(0, 1, (2, 3, 64)).astype(np.float32)
    ref = run_x(src, x)
    quantize_graph(src, tmp_path / "q41.onnx", "int4", Q41)
    rtn = Quantization("weight-only", block_size=32, accuracy_level=0, algorithm="rtn", symmetric=False, embedding=False)
    quantize_graph(src, tmp_path / "rtn.onnx", "int4", rtn)
    err_q41 = np.abs(run_x(tmp_path / "q41.onnx", x) - ref).max() / np.abs(ref).max()
    err_rtn = np.abs(run_x(tmp_path / "rtn.onnx", x) - ref).max() / np.abs(ref).max()
    assert err_q41 < 1e-4 and err_rtn > 50 * err_q41, (err_q41, err_rtn)
    fast = Quantization("weight-only", block_size=32, accuracy_level=4, algorithm="q4_1", embedding=False)
    quantize_graph(src, tmp_path / "q41-acc4.onnx", "int4", fast)     # int8 activations: close, not exact
    assert np.abs(run_x(tmp_path / "q41-acc4.onnx", x) - ref).max() < 0.05 * np.abs(ref).max()


def test_q4_1_is_exact_with_a_partial_last_block_and_constant_blocks(tmp_path):
    """K = 80 at block 32: the last block holds 16 rows (the block-sum indicator has 3 columns, not 2);
    a zero column and a constant block (max = min, d = 0) give their exact values, not NaN."""
    from deploylm.export.q4_1 import q4_1_fit

    rng = np.random.default_rng(5)
    w1, w2 = q4_1_weight(rng, 80, 48), q4_1_weight(rng, 48, 40)
    w1[:, 3] = 0.0
    w1[32:64, 5] = 0.25
    centred, offsets = q4_1_fit(w1, 32)
    assert offsets.shape == (3, 48) and np.isfinite(centred).all() and np.isfinite(offsets).all()
    assert np.abs(centred + np.repeat(offsets, 32, axis=0)[:80] - w1).max() <= 1e-6
    src = mlp_graph(tmp_path / "fp32.onnx", w1, w2)
    x = rng.normal(0, 1, (2, 3, 80)).astype(np.float32)
    ref = run_x(src, x)
    quantize_graph(src, tmp_path / "q.onnx", "int4", Q41)
    assert np.abs(run_x(tmp_path / "q.onnx", x) - ref).max() < 1e-4 * np.abs(ref).max()


def test_q4_1_graph_is_symmetric_4bit_plus_offsets(fp32, tmp_path):
    out = tmp_path / "q.onnx"
    q = Quantization("weight-only", block_size=32, accuracy_level=4, algorithm="q4_1", embedding=True)
    quantize_graph(fp32, out, "int4", q)
    model = onnx.load(str(out))
    nbits = {n.name: n for n in model.graph.node if n.op_type == "MatMulNBits"}
    attrs = {name: {a.name: a.i for a in n.attribute} for name, n in nbits.items()}
    assert sorted(a["bits"] for a in attrs.values()) == [4, 4, 8]
    assert all(a["accuracy_level"] == 4 for a in attrs.values())           # the lm_head too
    for name, n in nbits.items():
        if attrs[name]["bits"] == 4:
            assert len(n.input) < 4 or not n.input[3]                      # symmetric: no zero points
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 4 and all(n.name.endswith(".q4_1_offset") for n in matmuls)   # 2 block sums + 2 offsets
    assert "emb" not in {i.name for i in model.graph.initializer}
    assert out.stat().st_size < 0.4 * fp32.stat().st_size


def qkv_model(rng):
    """x [B, 64] -> three MatMuls over x (like q/k/v) -> Sum -> y [B, 32]."""
    w = [q4_1_weight(rng, 64, 32) for _ in range(3)]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"proj{i}") for i in range(3)]
    nodes.append(helper.make_node("Sum", ["y0", "y1", "y2"], ["y"], name="sum"))
    graph = helper.make_graph(nodes, "qkv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 32])],
                              [numpy_helper.from_array(a, f"w{i}") for i, a in enumerate(w)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


@pytest.mark.parametrize("fuse", [True, False])
def test_q4_1_matmuls_of_one_input_share_block_sums_and_fuse(fuse):
    from deploylm.export.q4_1 import split_offsets

    rng = np.random.default_rng(3)
    model = qkv_model(rng)
    x = rng.normal(0, 1, (5, 64)).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    done = split_offsets(model, ["proj0", "proj1", "proj2"], 32, fuse=fuse)
    assert done == (["proj0+proj1+proj2"] if fuse else ["proj0", "proj1", "proj2"])
    assert not {"w0", "w1", "w2"} & {i.name for i in model.graph.initializer}   # the fp32 weights are gone
    sums = [n for n in model.graph.node if n.op_type == "MatMul" and ".block_sum" in n.name]
    assert len(sums) == 1
    assert sum(n.op_type == "Split" for n in model.graph.node) == (1 if fuse else 0)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()


def test_q4_1_fuses_only_what_is_not_excluded(tmp_path):
    rng = np.random.default_rng(4)
    src = tmp_path / "qkv.onnx"
    onnx.save(qkv_model(rng), str(src))
    x = rng.normal(0, 1, (5, 64)).astype(np.float32)
    ref = run_x(src, x)
    quantize_graph(src, tmp_path / "q.onnx", "int4", Q41, exclude=("proj1",))
    model = onnx.load(str(tmp_path / "q.onnx"))
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert [(n.name, next(a.i for a in n.attribute if a.name == "N")) for n in nbits] == [("proj0+proj2_Q4", 64)]
    assert [n.input[1] for n in model.graph.node if n.name == "proj1"] == ["w1"]   # fp32, as it was
    assert np.abs(run_x(tmp_path / "q.onnx", x) - ref).max() < 1e-4 * np.abs(ref).max()


def test_q4_1_leaves_excluded_nodes_alone(fp32, tmp_path):
    out = tmp_path / "q.onnx"
    quantize_graph(fp32, out, "int4", Q41, exclude=("fc1",))
    model = onnx.load(str(out))
    plain = [n for n in model.graph.node if n.op_type == "MatMul" and not n.name.endswith(".q4_1_offset")]
    assert [n.name for n in plain] == ["fc1"] and plain[0].input[1] == "w1"
    assert not any(n.name.startswith("fc1.") for n in model.graph.node)


def test_q4_1_is_refused_at_8_bits(fp32, tmp_path):
    with pytest.raises(UsageError, match="q4_1.*4-bit only"):
        quantize_graph(fp32, tmp_path / "q.onnx", "int8", Q41)
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("text, message", [
    ('precision = "int8"\n[quantization]\nmethod = "weight-only"\nalgorithm = "q4_1"',
     r"quantization.algorithm = 'q4_1' does not apply to precision 'int8'"),
    ('precision = "int4"\n[quantization]\nalgorithm = "q5_0"', r"quantization.algorithm"),
])
def test_profile_refuses_q4_1_where_it_does_not_apply(text, message, tmp_path):
    from deploylm.profiles import ProfileError, load_profile

    path = tmp_path / "p.toml"
    path.write_text(f'name = "p"\n{text}\n[parity]\nlogits_atol = 1.0\nlogprob_atol = 1.0\nmin_token_agreement = 0.5\n')
    with pytest.raises(ProfileError, match=message) as info:
        load_profile(path)
    assert "\n" not in str(info.value)


def test_builtin_int4_profile_uses_q4_1_at_accuracy_level_4():
    from deploylm.profiles import load_profile

    q = load_profile("int4").quantization
    assert (q.algorithm, q.accuracy_level, q.block_size, q.embedding) == ("q4_1", 4, 32, True)


def test_percentile_calibration_prints_nothing(fp32, tmp_path, capfd):
    """onnxruntime's percentile calibrator prints its histogram settings; export's output stays its own."""
    import dataclasses

    q = dataclasses.replace(CASES["int8 static"][1], calibration_method="percentile")
    quantize_graph(fp32, tmp_path / "q.onnx", "int8", q, feeds=FEEDS)
    out = capfd.readouterr().out
    assert "histogram" not in out and "Percentile" not in out, out


def test_static_int8_leaves_activation_products_in_fp32(tmp_path):
    """onnxruntime's QDQ MatMul ignores MatMulConstBOnly: attention-like products (activation x activation)
    were quantized to uint8 too, which no fallback search could undo; only weight MatMuls are now."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="weights"),
             helper.make_node("Transpose", ["h"], ["ht"], name="t", perm=[1, 0]),
             helper.make_node("MatMul", ["h", "ht"], ["y"], name="scores")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])], [w])
    src = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), src)
    feeds = [{"x": rng.standard_normal((4, 8)).astype(np.float32)} for _ in range(4)]
    quantize_graph(src, tmp_path / "q.onnx", "int8", CASES["int8 static"][1], feeds=feeds)
    q = onnx.load(str(tmp_path / "q.onnx"))
    matmul = {n.name: n for n in q.graph.node if n.op_type == "MatMul"}
    quantized = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert matmul["weights"].output[0] in quantized                          # the weight MatMul is int8
    assert matmul["scores"].output[0] not in quantized                       # the product of activations is not
    assert "ht" not in quantized


def _weights_follow(out, weight_type: str, per_channel: bool, reduce_range: bool) -> dict:
    """Check w1 of the quantized graph `out` against the profile's weight settings; its initializers by name."""
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
    w1 = inits["w1_quantized"]
    assert w1.dtype == (np.uint8 if weight_type == "quint8" else np.int8)
    assert inits["w1_scale"].shape == ((H,) if per_channel else ())            # one scale per output channel
    span = int(w1.max()) - int(w1.min())
    assert (span <= 128) if reduce_range else (span > 128)                     # 7-bit weights
    return inits


@pytest.mark.parametrize("weight_type, per_channel, reduce_range", [("quint8", True, False), ("qint8", False, True)])
def test_dynamic_honours_weight_type_per_channel_and_reduce_range(fp32, tmp_path, weight_type, per_channel,
                                                                  reduce_range):
    out = tmp_path / "q.onnx"
    quantize_graph(fp32, out, "int8", Quantization("dynamic", weight_type=weight_type, per_channel=per_channel,
                                                   reduce_range=reduce_range))
    _weights_follow(out, weight_type, per_channel, reduce_range)


@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_zero_points_follow_symmetric(fp32, tmp_path, symmetric):
    out = tmp_path / "q.onnx"
    q = Quantization("weight-only", block_size=32, accuracy_level=0, algorithm="rtn", symmetric=symmetric,
                     embedding=False)
    quantize_graph(fp32, out, "int8", q)
    nbits = [n for n in onnx.load(str(out)).graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 3
    assert all((len(n.input) > 3 and bool(n.input[3])) is not symmetric for n in nbits)


@pytest.mark.parametrize("precision, case", [("int4", "int4 hqq"), ("int4", "int4 q4_1"),
                                             ("int8", "int8 weight-only")])
def test_excluded_lm_head_and_embedding_stay_fp32(fp32, tmp_path, precision, case):
    """The fallback search ranks the lm_head and the embedding Gather too (quantizable_nodes): keeping
    them in fp32 must keep them out of the int8 lm_head pass and the embedding quantization."""
    import dataclasses

    out = tmp_path / "q.onnx"
    q = dataclasses.replace(CASES[case][1], embedding=True)
    quantize_graph(fp32, out, precision, q, exclude=("lm_head", "embed"))
    model = onnx.load(str(out))
    nodes = {n.name: n for n in model.graph.node}
    producers = {o: n for n in model.graph.node for o in n.output}
    # kept in fp32, the lm_head reads the embedding through its Transpose: no second fp32 copy of the table
    weight = producers[nodes["lm_head"].input[1]]
    assert nodes["lm_head"].op_type == "MatMul" and weight.op_type == "Transpose" and weight.input[0] == "emb"
    assert "emb.untied_T" not in {i.name for i in model.graph.initializer}
    assert nodes["embed"].op_type == "Gather" and nodes["embed"].input[0] == "emb"
    assert not any(n.op_type == "MatMulNBits" and n.name.startswith("lm_head") for n in model.graph.node)


def test_int8_embedding_is_per_row_absmax_over_127_and_keeps_zero_rows(tmp_path):
    """Hand-computed: each row r is round(table[r] / s_r) * s_r with s_r = max |table[r]| / 127, so the
    row's largest magnitude comes back exactly; an all-zero row (a padding embedding) stays zeros."""
    from deploylm.export.quantize import quantize_embedding

    table = np.array([[0.5, -1.27, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0], [2.54, 1.0, -0.01, 0.02]], dtype=np.float32)
    graph = helper.make_graph([helper.make_node("Gather", ["emb", "ids"], ["y"], name="embed")], "g",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
                              [numpy_helper.from_array(table, "emb")])
    model = quantize_embedding(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), 8, 32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"ids": np.array([0, 1, 2], dtype=np.int64)})[0]
    s0, s2 = 1.27 / 127, 2.54 / 127
    want = np.array([[round(0.5 / s0) * s0, -1.27, round(0.3 / s0) * s0, 0.0], [0.0] * 4,
                     [2.54, round(1.0 / s2) * s2, round(-0.01 / s2) * s2, round(0.02 / s2) * s2]])
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_every_method_leaves_excluded_nodes_in_fp32(case, fp32, tmp_path):
    """The fallback's kept nodes reach every quantizer: an excluded fc1 still reads its fp32 weight while
    fc2 does not (dynamic and static ignored `exclude` without a test noticing)."""
    precision, q, _, _ = CASES[case]
    out = tmp_path / "q.onnx"
    quantize_graph(fp32, out, precision, q, feeds=FEEDS, exclude=("fc1",))
    model = onnx.load(str(out))
    nodes = {n.name: n for n in model.graph.node}
    inits = {i.name: i for i in model.graph.initializer}
    assert nodes["fc1"].op_type == "MatMul" and nodes["fc1"].input[1] == "w1"
    assert inits["w1"].data_type == TensorProto.FLOAT
    assert "w2" not in inits or not (nodes.get("fc2") and nodes["fc2"].op_type == "MatMul"
                                     and nodes["fc2"].input[1] == "w2")   # fc2 was quantized


@pytest.mark.parametrize("weight_type, per_channel, reduce_range", [("qint8", True, True), ("quint8", False, False)])
def test_static_honours_weight_type_per_channel_and_reduce_range_with_uint8_activations(fp32, tmp_path, weight_type,
                                                                                        per_channel, reduce_range):
    import dataclasses

    out = tmp_path / "q.onnx"
    q = dataclasses.replace(CASES["int8 static"][1], weight_type=weight_type, per_channel=per_channel,
                            reduce_range=reduce_range)
    quantize_graph(fp32, out, "int8", q, feeds=FEEDS)
    inits = _weights_follow(out, weight_type, per_channel, reduce_range)
    assert inits["x_zero_point"].dtype == np.uint8                             # activations: QUInt8


def test_percentile_calibration_clips_an_outlier_that_minmax_keeps(tmp_path):
    """calibration_method = "percentile" reaches onnxruntime: one outlier among many small activations
    sets minmax's range, not percentile's (a quantizer always calibrating with MinMax passed)."""
    import dataclasses

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], [w])
    src = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), src)
    x = rng.standard_normal((1 << 17, 8)).astype(np.float32)      # 2^20 values: 99.999% leaves out 10
    x[0, 0] = 1000.0
    scales = {}
    for method in ("minmax", "percentile"):
        q = dataclasses.replace(CASES["int8 static"][1], calibration_method=method)
        quantize_graph(src, tmp_path / f"{method}.onnx", "int8", q, feeds=[{"x": x}])
        inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / f"{method}.onnx")).graph.initializer}
        scales[method] = float(inits["x_scale"])
    assert scales["minmax"] > 1000.0 / 255 * 0.99 and scales["percentile"] < 0.1 * scales["minmax"], scales


@pytest.mark.parametrize("algorithm", ["rtn", "hqq", "q4_1"])
def test_weight_only_uses_the_profiles_block_size(algorithm, tmp_path):
    """block_size = 64 (not the built-in 32) reaches every 4-bit MatMulNBits and q4_1's offsets: one offset
    row per 64 weights, and weights on a Q4_1 grid of 64-blocks still come back exactly."""
    rng = np.random.default_rng(6)
    src = mlp_graph(tmp_path / "fp32.onnx", q4_1_weight(rng, 128, 64, block=64), q4_1_weight(rng, 64, 40, block=64))
    q = Quantization("weight-only", block_size=64, accuracy_level=0, algorithm=algorithm, symmetric=False,
                     embedding=False)
    quantize_graph(src, tmp_path / "q.onnx", "int4", q)
    model = onnx.load(str(tmp_path / "q.onnx"))
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 and all(next(a.i for a in n.attribute if a.name == "block_size") == 64 for n in nbits)
    if algorithm == "q4_1":
        offsets = {i.name: tuple(i.dims) for i in model.graph.initializer if i.name.endswith(".q4_1_offset")}
        assert sorted(offsets.values()) == [(1, 40), (2, 64)], offsets
        x = rng.normal(0, 1, (2, 3, 128)).astype(np.float32)
        ref = run_x(src, x)
        assert np.abs(run_x(tmp_path / "q.onnx", x) - ref).max() < 1e-4 * np.abs(ref).max()


def test_q4_1_writes_one_block_indicator_per_input_width():
    """Unfused, three MatMuls over the same K share one 0/1 block indicator initializer: no duplicate
    initializer names (an invalid ONNX graph that onnx.checker refuses) and no copies in the artifact."""
    from deploylm.export.q4_1 import split_offsets

    model = qkv_model(np.random.default_rng(3))
    split_offsets(model, ["proj0", "proj1", "proj2"], 32, fuse=False)
    names = [i.name for i in model.graph.initializer]
    assert len(names) == len(set(names)) and sum(n.startswith("q4_1.block_sum.") for n in names) == 1
    onnx.checker.check_model(model)


@pytest.mark.parametrize("case", ["int4 rtn", "int4 hqq", "int4 q4_1"])
def test_int4s_8_bit_lm_head_is_symmetric(fp32, tmp_path, case):
    """The int8 lm_head of every int4 algorithm is symmetric RTN: no zero points (even where the profile's
    4-bit weights are asymmetric, rtn with symmetric = false)."""
    out = tmp_path / "q.onnx"
    quantize_graph(fp32, out, "int4", CASES[case][1])
    heads = [n for n in onnx.load(str(out)).graph.node if n.op_type == "MatMulNBits"
             and next(a.i for a in n.attribute if a.name == "bits") == 8]
    assert len(heads) == 1 and heads[0].name.startswith("lm_head")
    assert len(heads[0].input) < 4 or not heads[0].input[3]
