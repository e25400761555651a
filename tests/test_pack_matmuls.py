"""Packing the MatMuls that read the same activation (deploylm.export.pack_matmuls): one MatMul over the
weights side by side and a Split give the outputs of the separate MatMuls, before and after int8
weight-only quantization; fp32, int8 (weight-only) and int8-rowwise exports pack, the other profiles do not."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from deploylm.backends.onnx_backend import create_session
from deploylm.export.onnx_export import EXPORT_SIZES, example_inputs, export_graph, plan_graphs
from deploylm.export.pack_matmuls import PACKED_SUFFIX, pack_graph_file, pack_model
from deploylm.export.pipeline import packs_matmuls
from deploylm.profiles import load_profile


def _run(path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return create_session(path, threads=1).run(None, feeds)


def _matmuls(path) -> int:
    import onnx

    return sum(n.op_type == "MatMul" for n in onnx.load(str(path), load_external_data=False).graph.node)


def test_shared_input_matmuls_become_one_matmul_and_a_split_with_the_same_outputs(tmp_path):
    """x feeds three weight MatMuls (one [4, 3], two [4, 2]) and one MatMul with an activation as its
    second input; y feeds one weight MatMul. Only the three are packed, in graph order."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {name: rng.standard_normal(shape).astype(np.float32)
               for name, shape in (("wa", (4, 3)), ("wb", (4, 2)), ("wc", (4, 2)), ("wy", (4, 5)))}
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["a"], name="a"),
             helper.make_node("Relu", ["a"], ["a_relu"]),                       # a consumer between members
             helper.make_node("MatMul", ["x", "wb"], ["b"], name="b"),
             helper.make_node("MatMul", ["y", "wy"], ["yo"], name="y"),
             helper.make_node("MatMul", ["x", "z"], ["xz"], name="activation"),  # not a weight: left alone
             helper.make_node("MatMul", ["x", "wc"], ["c"], name="c")]
    f32 = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)  # noqa: E731
    graph = helper.make_graph(nodes, "g", [f32("x", [2, 3, 4]), f32("y", [2, 4]), f32("z", [4, 6])],
                              [f32(n, None) for n in ("a_relu", "b", "c", "yo", "xz")],
                              [numpy_helper.from_array(w, name) for name, w in weights.items()])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))
    feeds = {"x": rng.standard_normal((2, 3, 4)).astype(np.float32), "y": rng.standard_normal((2, 4)).astype(np.float32),
             "z": rng.standard_normal((4, 6)).astype(np.float32)}
    before = _run(path, feeds)
    assert pack_graph_file(path) == [["a", "b", "c"]]
    after = _run(path, feeds)
    for want, got in zip(before, after):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(after[1], feeds["x"] @ weights["wb"], rtol=1e-6)
    model = onnx.load(str(path))
    assert [n.op_type for n in model.graph.node].count("MatMul") == 3      # packed, y's, the activation one
    assert {i.name for i in model.graph.initializer} >= {"wy", f"a{PACKED_SUFFIX}.weight"}
    assert not {"wa", "wb", "wc"} & {i.name for i in model.graph.initializer}   # the separate weights are gone
    assert pack_model(model) == []                                               # nothing left to pack


@pytest.fixture(scope="module")
def llama_graph(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama's decoder graph as exported (not packed), with its example inputs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    plan = plan_graphs(model)
    ((spec, module),) = plan.graphs
    folder = tmp_path_factory.mktemp("llama-graph")
    path = export_graph(module, spec, folder, plan.dims.vocab_size)
    feeds = {t.name: a.numpy() for t, a in zip(spec.inputs, example_inputs(spec, EXPORT_SIZES, plan.dims.vocab_size, seed=1))}
    return path, feeds, model.config.num_hidden_layers


def test_a_llama_graph_packs_qkv_and_gate_up_in_every_layer_with_the_same_outputs(llama_graph, tmp_path):
    path, feeds, layers = llama_graph
    packed = tmp_path / path.name
    shutil.copy(path, packed)
    for data in path.parent.glob(f"{path.name}.data"):
        shutil.copy(data, tmp_path / data.name)
    groups = pack_graph_file(packed)
    assert sorted(len(g) for g in groups) == [2] * layers + [3] * layers        # gate/up, q/k/v per layer
    assert _matmuls(packed) == _matmuls(path) - 3 * layers
    for want, got in zip(_run(path, feeds), _run(packed, feeds)):
        assert float(np.abs(got - want).max()) <= 1e-6                      # same bits on this machine


def _packed_copy(path, tmp_path):
    """The graph at `path` (and its data file) copied to tmp_path/packed/ and packed there."""
    packed = tmp_path / "packed" / path.name
    packed.parent.mkdir()
    shutil.copy(path, packed)
    for data in path.parent.glob(f"{path.name}.data"):
        shutil.copy(data, packed.parent / data.name)
    assert pack_graph_file(packed)
    return packed


def test_int8_weight_only_quantizes_a_packed_graph_to_the_same_outputs(llama_graph, tmp_path):
    """Why the int8 profile may pack before quantizing: MatMulNBits quantizes each weight column, and each
    activation block along K, the same whatever the weight's width."""
    from deploylm.export.quantize import quantize_graph

    path, feeds, _ = llama_graph
    packed = _packed_copy(path, tmp_path)
    q = load_profile("int8").quantization
    quantize_graph(path, tmp_path / "separate-int8.onnx", "int8", q)
    quantize_graph(packed, tmp_path / "packed-int8.onnx", "int8", q)
    separate, together = _run(tmp_path / "separate-int8.onnx", feeds), _run(tmp_path / "packed-int8.onnx", feeds)
    assert float(np.abs(separate[0] - _run(path, feeds)[0]).max()) > 1e-4      # it did quantize
    for want, got in zip(separate, together):
        assert float(np.abs(got - want).max()) <= 1e-6


def test_int8_rowwise_quantizes_a_packed_graph_to_the_outputs_of_the_separate_matmuls(llama_graph, tmp_path):
    """Unsmoothed, a row's scale and zero point come from the shared input alone and each weight column has its
    own scale: packing changes nothing but the number of nodes."""
    from deploylm.export.quantize import quantize_graph
    from deploylm.profiles import Quantization

    path, feeds, _ = llama_graph
    packed = _packed_copy(path, tmp_path)
    q = Quantization("rowwise", smooth_alpha=0.0, reduce_range=False, embedding=False)
    quantize_graph(path, tmp_path / "separate.onnx", "int8", q)
    quantize_graph(packed, tmp_path / "packed.onnx", "int8", q)
    separate, together = _run(tmp_path / "separate.onnx", feeds), _run(tmp_path / "packed.onnx", feeds)
    assert float(np.abs(separate[0] - _run(path, feeds)[0]).max()) > 1e-4      # it did quantize
    for want, got in zip(separate, together):
        assert float(np.abs(got - want).max()) <= 1e-5 * max(1.0, float(np.abs(want).max()))


def test_fp32_and_int8_weight_only_profiles_for_onnx_runtime_pack_and_the_others_do_not():
    assert packs_matmuls(load_profile("fp32")) and packs_matmuls(load_profile("int8"))
    assert packs_matmuls(load_profile("int8-rowwise"))
    for name in ("fp16", "bf16", "int8-dynamic", "int8-static", "int4", "trt-fp16", "trt-int8"):
        assert not packs_matmuls(load_profile(name)), name


def test_an_fp32_tensorrt_profile_does_not_pack(tmp_path):
    """The built-in TensorRT profiles are fp16 and int8, which would not pack anyway: an fp32 one for TensorRT does
    not either (TensorRT fuses on its own)."""
    from deploylm.profiles import builtin_dir

    text = (builtin_dir() / "fp32.toml").read_text().replace('name = "fp32"', 'name = "trt-fp32"')
    (tmp_path / "trt-fp32.toml").write_text(text.replace('backends = ["onnx"]', 'backends = ["onnx", "trt"]'))
    profile = load_profile(tmp_path / "trt-fp32.toml")
    assert profile.precision == "fp32" and list(profile.backends) == ["onnx", "trt"]
    assert not packs_matmuls(profile)


@pytest.mark.parametrize("name", ["fp16", "int4", "int8-dynamic", "fp32", "int8", "int8-rowwise"])
def test_quality_compares_with_the_fp32_graphs_as_shipped_packed(llama_graph, tmp_path, name):
    """"speed N× fp32" in export's quality line: the profiles that quantize unpacked graphs are timed
    against a packed copy (what --profile fp32 ships), not the slower unpacked graphs they start from."""
    from deploylm.export.precision_step import _shipped_fp32

    path, feeds, layers = llama_graph
    ref = tmp_path / "fp32"
    ref.mkdir()
    for file in path.parent.iterdir():
        shutil.copy(file, ref / file.name)
    shipped = _shipped_fp32(tmp_path, ref, [path.name], load_profile(name))
    if packs_matmuls(load_profile(name)):
        assert shipped == ref                     # its graphs were packed before it: the same form already
        return
    assert shipped != ref and _matmuls(shipped / path.name) == _matmuls(ref / path.name) - 3 * layers
    assert _matmuls(ref / path.name) == _matmuls(path)                 # the candidates' base stays as exported
    for want, got in zip(_run(ref / path.name, feeds), _run(shipped / path.name, feeds)):
        assert float(np.abs(got - want).max()) <= 1e-6


def test_a_graph_with_external_weights_keeps_them_in_its_data_file_with_its_permissions(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    wq, wk = (rng.standard_normal((4, n)).astype(np.float32) for n in (300, 200))   # > 1 KiB: stay external
    f32 = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)  # noqa: E731
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
                               helper.make_node("MatMul", ["x", "wk"], ["k"], name="k")], "g", [f32("x", [2, 4])],
                              [f32("q", None), f32("k", None)],
                              [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(wk, "wk")])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path),
              save_as_external_data=True, location="g.onnx.data", size_threshold=0)
    (tmp_path / "g.onnx.data").chmod(0o600)
    path.chmod(0o644)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    assert pack_graph_file(path) == [["q", "k"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx", "g.onnx.data"]
    assert (tmp_path / "g.onnx.data").stat().st_mode & 0o777 == 0o600
    assert not onnx.load(str(path), load_external_data=False).graph.initializer[0].raw_data   # still external
    q, k = _run(path, {"x": x})
    np.testing.assert_allclose(q, x @ wq, rtol=1e-6)
    np.testing.assert_allclose(k, x @ wk, rtol=1e-6)
