"""int8 rowwise quantization (deploylm.export.rowwise): per-row activations x per-column weights, MatMulInteger,
SmoothQuant; checked against a NumPy reference of the same arithmetic, and end to end through `deploylm export`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploylm.errors import UsageError
from deploylm.export import rowwise
from deploylm.export.quantize import quantize_graph
from deploylm.profiles import ProfileError, Quantization, load_profile
from tests.helpers.tied_graph import FEEDS, tied_graph
from tests.helpers.tied_graph import run as run_feeds

K, N = 64, 48
# onnxruntime sums uint8 x int8 pairs in 16 bits on x86 CPUs without VNNI/AMX (VPMADDUBSW), clamping what does not
# fit: the closeness checks use 7-bit weights there, which cannot overflow (2 x 255 x 63 < 32767)
SATURATES = rowwise.cpu_has_vnni() is False


def one_matmul(weight: np.ndarray, opset: int = 18) -> onnx.ModelProto:
    """x [B, S, K] -> MatMul(w) -> y [B, S, N]."""
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", weight.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", weight.shape[1]])],
                              [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def reference(x: np.ndarray, w: np.ndarray, factor: np.ndarray, top: int = 127) -> np.ndarray:
    """The same quantization written out in NumPy: smoothing, one uint8 scale/zero point per row, int8 columns."""
    xs = x / factor
    ws = w * factor[:, None]
    col = np.maximum(np.abs(ws).max(0), rowwise.EPS) / top
    wq = np.clip(np.round(ws / col), -top, top)
    lo, hi = xs.min(-1, keepdims=True), xs.max(-1, keepdims=True)
    s = np.maximum((hi - lo) / 255, rowwise.EPS)
    zp = -np.round(lo / s)
    xq = np.clip(np.round(xs / s) + zp, 0, 255)
    return ((xq - zp) @ wq) * s * col


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((K, N)) * 0.1).astype(np.float32)
    x = rng.standard_normal((2, 5, K)).astype(np.float32)
    x[..., 7] *= 40.0                         # an outlier channel, as LLM activations have
    return x, w


@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("opset", [17, 18])   # ReduceMin/Max take the axis as an input from opset 18
def test_the_graph_computes_the_reference_quantization(data, alpha, opset):
    x, w = data
    model = one_matmul(w, opset)
    nodes = rowwise.target_nodes(model)
    maxima = rowwise.channel_maxima(model, nodes, [{"x": x}])
    rowwise.rewrite(model, nodes, maxima, alpha, reduce_range=SATURATES)
    onnx.checker.check_model(model)
    assert "MatMul" not in {n.op_type for n in model.graph.node} and "MatMulInteger" in {n.op_type for n in model.graph.node}
    factor = rowwise.smoothing(maxima["mm"], w, alpha) if alpha else np.ones(K, np.float32)
    want = reference(x.astype(np.float64), w.astype(np.float64), factor.astype(np.float64), 63 if SATURATES else 127)
    got = run(model, x)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert np.abs(got - x @ w).max() <= 0.05 * np.abs(x @ w).max()     # and it is a fair int8 approximation


def test_unnamed_matmuls_are_rewritten_too(data):
    """Node names are optional in ONNX: two unnamed MatMuls must not get the same names and initializers."""
    x, w = data
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
                               helper.make_node("MatMul", ["r", "w2"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", K])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w.T.copy(), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    want = run(model, x)
    nodes = rowwise.target_nodes(model)
    maxima = rowwise.channel_maxima(model, nodes, [{"x": x}])
    assert len(maxima) == 2
    rowwise.rewrite(model, nodes, maxima, 0.5, SATURATES)
    onnx.checker.check_model(model)
    got = run(model, x)
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()


def test_smoothing_lowers_the_error_an_outlier_channel_causes(data):
    x, w = data
    errors = {}
    for alpha in (0.0, 0.5):
        model = one_matmul(w)
        nodes = rowwise.target_nodes(model)
        rowwise.rewrite(model, nodes, rowwise.channel_maxima(model, nodes, [{"x": x}]), alpha, SATURATES)
        errors[alpha] = np.abs(run(model, x) - x @ w).mean()
    assert errors[0.5] < 0.5 * errors[0.0], errors


def test_channel_maxima_are_the_largest_magnitudes_over_every_feed(data):
    x, w = data
    model = one_matmul(w)
    feeds = [{"x": x}, {"x": -3 * x[:1, :2]}]
    before = model.SerializeToString()
    maxima = rowwise.channel_maxima(model, rowwise.target_nodes(model), feeds)
    assert model.SerializeToString() == before                 # the probe's extra outputs are gone again
    want = np.maximum(np.abs(x).reshape(-1, K).max(0), np.abs(3 * x[:1, :2]).reshape(-1, K).max(0))
    np.testing.assert_allclose(maxima["mm"], want, rtol=1e-6)


def test_channel_maxima_leave_out_padded_positions(data):
    """Calibration batches are left-padded: the hidden states at pad positions are no real input, and letting their
    values set the smoothing cost SmolLM2 +7.1% perplexity against +2.4% without them (the export's quality check)."""
    x, w = data
    x = x.copy()
    mask = np.ones(x.shape[:2], np.int64)
    mask[0, :2] = 0                                    # the first row's first two positions are padding
    x[0, :2] = 1000.0
    model = one_matmul(w)
    maxima = rowwise.channel_maxima(model, rowwise.target_nodes(model), [{"x": x, "attention_mask": mask}])
    np.testing.assert_allclose(maxima["mm"], np.abs(x[mask.astype(bool)]).max(0), rtol=1e-6)
    step = {"x": x[:, -1:], "attention_mask": np.ones((2, 9), np.int64)}   # a decode step: the mask spans the past
    maxima = rowwise.channel_maxima(model, rowwise.target_nodes(model), [step])
    np.testing.assert_allclose(maxima["mm"], np.abs(x[:, -1]).max(0), rtol=1e-6)


def test_a_row_of_zeros_gives_zeros_and_constant_rows_stay_exact(data):
    x, w = data
    model = one_matmul(w)
    rowwise.rewrite(model, rowwise.target_nodes(model), None, 0.0, SATURATES)
    x = x.copy()
    x[0, 0] = 0.0                                  # e.g. a padded position
    x[0, 1] = 2.5                                  # every channel alike: lo = hi
    got = run(model, x)
    assert np.isfinite(got).all()
    assert np.abs(got[0, 0]).max() == 0.0
    np.testing.assert_allclose(got[0, 1], (x[0, 1] @ w), rtol=0.02, atol=0.02 * np.abs(x[0, 1] @ w).max())


@pytest.mark.parametrize("reduce_range, top", [(False, 127), (True, 63)])
def test_weights_are_int8_per_column_or_7_bits_with_reduce_range(data, reduce_range, top):
    x, w = data
    model = one_matmul(w)
    rowwise.rewrite(model, rowwise.target_nodes(model), None, 0.0, reduce_range)
    weight = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "mm.rowwise.weight"))
    assert weight.dtype == np.int8 and weight.shape == (K, N)
    assert np.abs(weight).max(axis=0).tolist() == [top] * N          # every column uses its whole range
    assert "w" not in {i.name for i in model.graph.initializer}      # the fp32 weight is gone


ROWWISE = Quantization("rowwise", smooth_alpha=0.5, calibration_samples=4, reduce_range=SATURATES, embedding=True)


def test_quantize_graph_rewrites_every_weight_matmul_and_quantizes_the_tied_lm_head_and_the_embedding(tmp_path):
    """The lm_head is int8 weight-only (MatMulNBits, int8 activations per block), as in the int8 profile."""
    src = tied_graph(tmp_path / "fp32.onnx")
    out = tmp_path / "q.onnx"
    quantize_graph(src, out, "int8", ROWWISE, feeds=FEEDS)
    model = onnx.load(str(out))
    assert [n.input[1] for n in model.graph.node if n.op_type == "MatMulInteger"] == ["fc1.rowwise.weight",
                                                                                       "fc2.rowwise.weight"]
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits")          # the logits' MatMul: int8 blocks
    assert head.output == ["logits"] and {a.name: a.i for a in head.attribute}["bits"] == 8
    assert "emb" not in {i.name for i in model.graph.initializer}                  # int8 rows instead
    ref, got = run_feeds(src), run_feeds(out)
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()
    matrices = [i for i in model.graph.initializer if len(i.dims) == 2 and min(i.dims) > 1 and i.data_type == TensorProto.FLOAT]
    assert [i.name for i in matrices] == [] and out.stat().st_size < src.stat().st_size   # no fp32 matrix is left


def test_excluded_nodes_stay_fp32_matmuls(tmp_path):
    out = tmp_path / "q.onnx"
    quantize_graph(tied_graph(tmp_path / "fp32.onnx"), out, "int8", ROWWISE, feeds=FEEDS, exclude=("lm_head",))
    model = onnx.load(str(out))
    assert [n.name for n in model.graph.node if n.op_type == "MatMul"] == ["lm_head"]
    assert sum(n.op_type == "MatMulInteger" for n in model.graph.node) == 2
    assert not any(n.op_type == "MatMulNBits" for n in model.graph.node)


def test_smoothing_without_calibration_feeds_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="smooth_alpha > 0 needs calibration samples"):
        quantize_graph(tied_graph(tmp_path / "fp32.onnx"), tmp_path / "q.onnx", "int8", ROWWISE, feeds=None)
    quantize_graph(tied_graph(tmp_path / "fp32.onnx"), tmp_path / "q.onnx", "int8",
                   Quantization("rowwise", smooth_alpha=0.0, reduce_range=False, embedding=False), feeds=None)
    assert (tmp_path / "q.onnx").is_file()


def test_the_builtin_profile_and_its_keys(tmp_path):
    from deploylm.export.pipeline import packs_matmuls
    from deploylm.export.precision_step import uses_calibration

    profile = load_profile("int8-rowwise")
    q = profile.quantization
    assert (q.method, q.smooth_alpha, q.calibration_samples, q.reduce_range, q.embedding) == ("rowwise", 0.5, 32,
                                                                                                False, True)
    assert packs_matmuls(profile) and uses_calibration(profile)
    base = (Path(__file__).parents[1] / "profiles" / "int8-rowwise.toml").read_text()
    unsmoothed = tmp_path / "plain.toml"
    unsmoothed.write_text(base.replace('name = "int8-rowwise"', 'name = "plain"')
                          .replace("smooth_alpha = 0.5", "smooth_alpha = 0").replace("auto = true", "auto = false"))
    assert not uses_calibration(load_profile(unsmoothed))          # nothing reads --calibration then
    for old, new, message in [("smooth_alpha = 0.5", "smooth_alpha = 1.5", r"smooth_alpha.*a number >= 0.0 and <= 1.0"),
                              ("smooth_alpha = 0.5", "block_size = 32", r"block_size.*does not apply to method 'rowwise'"),
                              ('method = "rowwise"', 'method = "weight-only"',
                               r"smooth_alpha.*does not apply to method 'weight-only'")]:
        bad = tmp_path / "bad.toml"
        bad.write_text(base.replace('name = "int8-rowwise"', 'name = "bad"').replace(old, new))
        with pytest.raises(ProfileError, match=message):
            load_profile(bad)


def test_export_of_a_tiny_llama_with_the_rowwise_profile_decodes_like_torch(tiny_llama_dir, tmp_path, monkeypatch,
                                                                          caplog):
    """The whole path a user takes: export (smoothing from the built-in calibration text, quality and parity
    checked), then the artifact's own generate against the torch backend on the source."""
    from click.testing import CliRunner

    from deploylm.cli import cli

    out = tmp_path / "llama-rowwise"
    result = CliRunner().invoke(cli, ["export", "--model", str(tiny_llama_dir), "--profile", "int8-rowwise",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "precision: int8 (rowwise)" in result.output, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quality"]["method"] == "rowwise" and manifest["quality"]["calibration"] == "builtin"
    assert manifest["parity"]["passed"] is True
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    kept = sum(len(v) for v in manifest["quality"]["kept_fp32"].values())
    assert sum(n.op_type == "MatMulInteger" for n in graph.graph.node) >= 1 and kept < 8
    run = CliRunner().invoke(cli, ["generate", "--model", str(out), "--num-beams", "1", "--max-new-tokens", "8",
                                   "--json", "The capital of France is"])
    assert run.exit_code == 0, run.output
    assert len(json.loads(run.output)["outputs"][0]["token_ids"]) == 8
    # opened on a CPU without VNNI/AMX, the artifact says its products can saturate there
    import logging

    from deploylm.backends.onnx_backend import OnnxBackend

    monkeypatch.setattr(rowwise, "cpu_has_vnni", lambda cpuinfo=None: False)
    monkeypatch.setattr(rowwise, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="deploylm"):
        OnnxBackend.from_source(out)
    assert [r.getMessage() for r in caplog.records if "saturate" in r.getMessage()], caplog.text


@pytest.mark.parametrize("cpuinfo, has", [
    ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni amx_tile\n", True),
    ("flags\t\t: fpu sse2 avx2 avx_vnni\n", True),
    ("flags\t\t: fpu sse2 avx2 fma\n", False),            # AVX2 without VNNI: VPMADDUBSW's 16-bit sums
    ("processor\t: 0\nFeatures\t: fp asimd asimddp\n", None),   # ARM: not x86 flags
    ("", None)])
def test_cpu_has_vnni_reads_the_x86_flags(cpuinfo, has):
    assert rowwise.cpu_has_vnni(cpuinfo) is has


def test_this_machines_flags_are_read_once_per_process(monkeypatch):
    """Opening rowwise artifacts asks about this CPU each time; /proc/cpuinfo is read at the first question only."""
    reads = []
    real = Path.read_text

    def read_text(self, *args, **kwargs):
        if str(self) == "/proc/cpuinfo":
            reads.append(1)
            return "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    rowwise._this_cpu_has_vnni.cache_clear()
    try:
        assert [rowwise.cpu_has_vnni() for _ in range(3)] == [False] * 3
        assert len(reads) == 1
    finally:
        rowwise._this_cpu_has_vnni.cache_clear()   # the next caller reads the real machine's flags


def test_a_rowwise_artifact_warns_once_on_a_cpu_without_vnni(monkeypatch, caplog, tmp_path):
    manifest = {"profile": {"name": "int8-rowwise", "quantization": {"method": "rowwise", "reduce_range": False}}}
    monkeypatch.setattr(rowwise, "cpu_has_vnni", lambda cpuinfo=None: False)
    monkeypatch.setattr(rowwise, "_warned", set())
    with caplog.at_level("WARNING", logger="deploylm"):
        rowwise.warn_if_saturating(manifest, tmp_path)
        rowwise.warn_if_saturating(manifest, tmp_path)                  # once per artifact
        seven_bits = {"profile": {"name": "p", "quantization": {"method": "rowwise", "reduce_range": True}}}
        rowwise.warn_if_saturating(seven_bits, tmp_path / "b")           # 7-bit weights cannot saturate
        rowwise.warn_if_saturating({"profile": {"name": "int8", "quantization": {"method": "weight-only"}}},
                                   tmp_path / "c")
    assert len(caplog.records) == 1 and "reduce_range = true" in caplog.records[0].getMessage()
    assert str(tmp_path) in caplog.records[0].getMessage()
    caplog.clear()
    monkeypatch.setattr(rowwise, "cpu_has_vnni", lambda cpuinfo=None: True)
    with caplog.at_level("WARNING", logger="deploylm"):
        rowwise.warn_if_saturating(manifest, tmp_path / "d")
    assert caplog.records == []
