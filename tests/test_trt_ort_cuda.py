"""ONNX Runtime IO binding onto torch tensors (deploylm.backends.ort_cuda): on CPU here, on CUDA in
tests/test_gpu.py; and the refusals when onnxruntime has no CUDA provider."""
from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from deploylm.backends import ort_cuda
from deploylm.errors import MissingDependencyError, UsageError


def add_session(tmp_path, providers=("CPUExecutionProvider",)):
    """A graph y = a + b over float32 [n]."""
    import onnx

    nodes = [helper.make_node("Add", ["a", "b"], ["y"])]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n"]) for n in ("a", "b", "y")]
    model = helper.make_model(helper.make_graph(nodes, "add", io[:2], io[2:]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "add.onnx")
    return ort.InferenceSession(str(tmp_path / "add.onnx"), providers=list(providers))


def test_outputs_are_written_into_the_bound_torch_tensor(tmp_path):
    session = add_session(tmp_path)
    a, b = torch.arange(4.0), torch.full((4,), 10.0)
    y = torch.zeros(4)
    ptr = y.data_ptr()
    ort_cuda.run_bound(session, {"a": a, "b": b}, {"y": y})
    assert y.tolist() == [10.0, 11.0, 12.0, 13.0] and y.data_ptr() == ptr


def test_empty_tensors_are_bound_through_a_placeholder(tmp_path):
    session = add_session(tmp_path)
    empty = torch.zeros(0)
    y = torch.zeros(0)
    ort_cuda.run_bound(session, {"a": empty, "b": empty}, {"y": y})   # a null address would be refused
    assert y.shape == (0,)


def test_binding_refuses_bad_tensors(tmp_path):
    binding = add_session(tmp_path).io_binding()
    with pytest.raises(UsageError, match="contiguous"):
        ort_cuda.bind_input(binding, "a", torch.zeros(4, 2).t())
    with pytest.raises(UsageError, match="bfloat16"):
        ort_cuda.bind_output(binding, "y", torch.zeros(4, dtype=torch.bfloat16))


def test_cpu_session_is_refused_as_cuda(tmp_path):
    with pytest.raises(MissingDependencyError, match=r"runs on CPUExecutionProvider.*deploylm\[gpu\]"):
        ort_cuda.require_cuda_session(add_session(tmp_path))


def test_provider_choice():
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ort_cuda.session_providers(gpu, device_id=1, use_tensorrt=True) == [
        ("TensorrtExecutionProvider", {"device_id": 1}), ("CUDAExecutionProvider", {"device_id": 1}),
        "CPUExecutionProvider"]
    assert ort_cuda.session_providers(gpu, use_tensorrt=False)[0] == ("CUDAExecutionProvider", {"device_id": 0})
    with pytest.raises(MissingDependencyError, match="has no CUDAExecutionProvider"):
        ort_cuda.session_providers(["CPUExecutionProvider"])
