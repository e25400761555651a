"""Engine building without TensorRT: the pure helpers, and build_engines driven through a fake
`tensorrt` module that records what the builder was asked to do (flags, profiles, fp32 layers,
timing cache, files written)."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from deploylm.errors import ArtifactError, UsageError
from deploylm.export import tensorrt as trt_build
from deploylm.export import trt_env
from deploylm.export.trt_calibration import calibration_batches
from deploylm.export.trt_env import TrtEnv
from deploylm.profiles import load_profile

H, D = 2, 4


def _decoder_graph(path: Path) -> Path:
    # a str is a dynamic axis (dim_param), an int a fixed size
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["batch", H, "past", D]),
              helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT, ["batch", H, "past", D])]
    nodes = [helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"], name="/k"),
             helper.make_node("Identity", ["past_key_values.0.value"], ["present.0.value"], name="/v"),
             helper.make_node("Softmax", ["present.0.key"], ["probs"], name="/attn/Softmax"),
             helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT, name="/cast"),
             helper.make_node("LayerNormalization", ["ids_f", "scale"], ["logits"], name="/norm/LN")]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("logits", "present.0.key", "present.0.value")]
    init = [helper.make_tensor("scale", TensorProto.FLOAT, [1], [1.0])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, init)
    onnx.save(helper.make_model(graph), path / "model.onnx")
    return path / "model.onnx"


def test_builder_flags_per_precision():
    assert trt_build.builder_flags("fp16", pinned=True) == (("FP16", "OBEY_PRECISION_CONSTRAINTS"), ())
    assert trt_build.builder_flags("bf16", pinned=False) == (("BF16",), ())
    assert trt_build.builder_flags("int8", pinned=True)[0] == ("INT8", "FP16", "OBEY_PRECISION_CONSTRAINTS")
    assert trt_build.builder_flags("fp32", pinned=True) == ((), ("TF32",))
    with pytest.raises(UsageError, match="int4"):
        trt_build.builder_flags("int4", pinned=False)


def test_graph_reading_and_fp32_islands(tmp_path):
    path = _decoder_graph(tmp_path)
    assert trt_build.find_graphs(tmp_path) == ["model"]
    dims = trt_build.graph_inputs(path)
    assert dims["past_key_values.0.key"] == (None, H, None, D) and "scale" not in dims
    targets = trt_build.fallback_tensors(trt_build.onnx_nodes(path), ["LayerNormalization", "Softmax"], ["/cast"])
    assert targets == {"logits", "probs", "ids_f"}
    layers = [("/attn/Softmax", (("probs", "FLOAT"),)), ("/cast", (("ids_f", "HALF"),)),
              ("shape", (("probs_shape", "INT64"),)), ("/norm/LN", (("logits", "FLOAT"),)),
              ("/k", (("present.0.key", "FLOAT"),))]
    assert trt_build.layers_to_pin(layers, targets) == [0, 1, 3]


def test_calibrator_only_for_int8_without_qdq():
    plain = [("/mm", "MatMul", ("y",))]
    qdq = plain + [("/q", "QuantizeLinear", ("yq",)), ("/dq", "DequantizeLinear", ("yd",))]
    assert trt_build.needs_calibrator("int8", plain) and not trt_build.needs_calibrator("int8", qdq)
    assert not trt_build.needs_calibrator("fp16", plain)


def test_find_graphs_refuses_incomplete_artifacts(tmp_path):
    (tmp_path / "encoder_model.onnx").write_bytes(b"")
    with pytest.raises(ArtifactError, match="decoder_model.onnx"):
        trt_build.find_graphs(tmp_path)


def test_calibration_batches_are_left_padded_to_the_opt_shape():
    batches = calibration_batches([[5, 6, 7], [8], [1, 2, 3, 4, 5, 6]], rows=2, seq=4, pad_id=0, samples=5)
    assert len(batches) == 2                                     # 5 samples -> 2 full batches of 2
    first = batches[0]
    assert first["input_ids"] == [[0, 5, 6, 7], [0, 0, 0, 8]]
    assert first["attention_mask"] == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert first["position_ids"] == [[0, 0, 1, 2], [0, 0, 0, 0]]
    assert batches[1]["input_ids"] == [[1, 2, 3, 4], [0, 5, 6, 7]]  # truncated to seq, then cycled
    with pytest.raises(UsageError, match="non-empty"):
        calibration_batches([[]], rows=1, seq=2, pad_id=0, samples=1)


# ---- build_engines through a fake tensorrt ---------------------------------------------------------

class _Net:
    def __init__(self):
        self.layers = []

    @property
    def num_layers(self):
        return len(self.layers)

    def get_layer(self, i):
        return self.layers[i]


class _Layer:
    def __init__(self, name, outputs):
        self.name, self.precision, self.out_types = name, None, {}
        self.outputs = [types.SimpleNamespace(name=o, dtype=types.SimpleNamespace(name="FLOAT")) for o in outputs]
        self.num_outputs = len(outputs)

    def get_output(self, j):
        return self.outputs[j]

    def set_output_type(self, j, t):
        self.out_types[j] = t


class _Config:
    def __init__(self, log):
        self.log, self.flags, self.profiles, self.int8_calibrator = log, set(), [], None

    def set_flag(self, f): self.flags.add(f)
    def clear_flag(self, f): self.log["cleared"] = f
    def set_memory_pool_limit(self, pool, size): self.log["workspace"] = (pool, size)
    def create_timing_cache(self, data): self.log.setdefault("caches", []).append(bytes(data)); return bytes(data)

    def set_timing_cache(self, cache, ignore_mismatch):  # TensorRT: False for another GPU's cache
        self.log["cache_set"] = (cache, ignore_mismatch)
        return cache in (b"", b"TIMING")
    def add_optimization_profile(self, p): self.profiles.append(p.shapes); return len(self.profiles) - 1
    def get_timing_cache(self): return types.SimpleNamespace(serialize=lambda: b"TIMING")


def _fake_trt(log):
    class Builder:
        def __init__(self, logger): pass
        def create_network(self, flags): log["net"] = _Net(); return log["net"]
        def create_builder_config(self): log["config"] = _Config(log); return log["config"]
        def create_optimization_profile(self):
            p = types.SimpleNamespace(shapes={})
            p.set_shape = lambda name, lo, opt, hi: p.shapes.__setitem__(name, (lo, opt, hi))
            return p
        def build_serialized_network(self, net, config): return b"PLAN-BYTES"

    class OnnxParser:
        def __init__(self, network, logger): self.network = network
        num_errors = 0
        def parse_from_file(self, path):
            for name, _, outs in trt_build.onnx_nodes(Path(path)):
                self.network.layers.append(_Layer(name, outs))
            return True

    mod = types.ModuleType("tensorrt")
    mod.__version__ = "10.3.0"
    mod.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    mod.BuilderFlag = types.SimpleNamespace(FP16="FP16", BF16="BF16", INT8="INT8", TF32="TF32",
                                            OBEY_PRECISION_CONSTRAINTS="OBEY")
    mod.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    mod.float32 = "fp32-type"
    mod.Builder, mod.OnnxParser = Builder, OnnxParser
    return mod


@pytest.fixture
def trt_log(tmp_path, monkeypatch):
    """The fake tensorrt module installed (with TensorRT and CUDA "present"), a decoder graph in tmp_path;
    yields the log the fake writes what the builder asked of it into."""
    log: dict = {}
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_trt(log))
    monkeypatch.setattr(trt_env.importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _decoder_graph(tmp_path)
    return log


def test_build_engines_configures_two_profiles_precision_and_cache(tmp_path, trt_log):
    log = trt_log
    infos = trt_build.build_engines(tmp_path, load_profile("trt-fp16"))
    (info,) = infos
    assert (tmp_path / "trt" / "model.plan").read_bytes() == b"PLAN-BYTES"
    assert (tmp_path / "trt" / "timing.cache").read_bytes() == b"TIMING" and log["caches"] == [b""]
    assert log["config"].flags == {"FP16", "OBEY"} and log["workspace"] == ("WORKSPACE", 4 << 30)
    prefill, decode = log["config"].profiles                     # profile 0 = prefill, 1 = decode
    assert prefill["input_ids"] == ((1, 1), (4, 64), (32, 512))
    assert prefill["past_key_values.0.key"][2] == (32, H, 0, D)
    assert decode["input_ids"] == ((1, 1), (16, 1), (128, 1))    # 32 inputs x 4 beams
    assert decode["past_key_values.0.key"] == ((1, H, 1, D), (16, H, 64, D), (128, H, 512, D))
    pinned = {l.name: l for l in log["net"].layers if l.precision == "fp32-type"}
    assert set(pinned) == {"/attn/Softmax", "/norm/LN"} and pinned["/norm/LN"].out_types == {0: "fp32-type"}
    assert info.phases == ("prefill", "decode") and info.fp32_layers == 2 and info.file == "trt/model.plan"
    section = trt_build.trt_manifest_section(infos, TrtEnv("10.3.0", "NVIDIA H200", "9.0"))
    assert section["engines"][0]["shapes"]["decode"]["input_ids"][2] == (128, 1)
    assert trt_env.engine_compatibility(section, TrtEnv("10.3.0", "NVIDIA H200", "9.0")) == (True, "")


def test_entropy_calibrator_hands_out_opt_shape_batches_by_address(tmp_path):
    from deploylm.export.trt_calibration import make_calibrator
    from deploylm.export.trt_shapes import TrtShapes, profile_shapes

    fake = types.SimpleNamespace(IInt8EntropyCalibrator2=type("Base", (), {"__init__": lambda self: None}))
    inputs = {"input_ids": (None, None), "attention_mask": (None, None), "position_ids": (None, None),
              "past_key_values.0.key": (None, H, None, D)}
    shapes = profile_shapes(inputs, TrtShapes((1, 2, 4), (1, 3, 8), (0, 3, 8)), "prefill", decoder_only=True)
    profile = types.SimpleNamespace(quantization=types.SimpleNamespace(calibration_samples=4))
    calib = make_calibrator(fake, tmp_path, shapes, profile, [[5, 6], [7, 8, 9, 10]], tmp_path / "c.calib", device="cpu")
    names = ["input_ids", "attention_mask", "past_key_values.0.key"]
    first = calib.get_batch(names)
    assert first[0] == calib.live["input_ids"].data_ptr() and first[2] == calib.dummy.data_ptr()  # empty past
    assert calib.live["input_ids"].tolist() == [[0, 5, 6], [7, 8, 9]]                # [opt rows, opt seq]
    assert calib.get_batch(names) is not None and calib.get_batch(names) is None     # 4 samples = 2 batches
    assert calib.read_calibration_cache() is None
    calib.write_calibration_cache(b"scales")
    assert calib.read_calibration_cache() == b"scales"


def test_a_timing_cache_tensorrt_refuses_is_replaced_by_an_empty_one(tmp_path, trt_log):
    log = trt_log
    (tmp_path / "trt").mkdir()
    (tmp_path / "trt" / "timing.cache").write_bytes(b"ANOTHER-GPU")
    trt_build.build_engines(tmp_path, load_profile("trt-fp16"))
    assert log["caches"] == [b"ANOTHER-GPU", b""] and log["cache_set"] == (b"", False)
    assert (tmp_path / "trt" / "timing.cache").read_bytes() == b"TIMING"
