"""ONNX Runtime on the GPU: providers, and IO binding onto torch tensors (no host copies).

For the onnx backend: `session_providers` picks TensorRT EP / CUDA EP / CPU from what the installed
onnxruntime offers; `require_cuda_session` refuses a session that silently fell back to CPU;
`bind_input` / `bind_output` bind torch tensors (CPU or CUDA) by data_ptr; `run_bound` runs a
session with every input and output bound, so outputs land in preallocated torch memory.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from deploylm.errors import MissingDependencyError, UsageError

CUDA_EP = "CUDAExecutionProvider"
TRT_EP = "TensorrtExecutionProvider"
CPU_EP = "CPUExecutionProvider"
GPU_HINT = "pip install 'deploylm[gpu]' (onnxruntime-gpu) on a machine with an NVIDIA GPU"
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
          torch.int32: np.int32, torch.bool: np.bool_, torch.int8: np.int8, torch.uint8: np.uint8}


def session_providers(available: list[str], *, device_id: int = 0, use_tensorrt: bool | None = None) -> list[Any]:
    """Providers for an onnxruntime.InferenceSession on GPU `device_id`, best first.

    TensorRT EP only when onnxruntime offers it and `tensorrt` imports (or use_tensorrt=True);
    raises MissingDependencyError when this onnxruntime has no CUDA EP.
    """
    if CUDA_EP not in available:
        raise MissingDependencyError(f"onnxruntime has no {CUDA_EP} (it offers {', '.join(available) or 'nothing'}): {GPU_HINT}")
    if use_tensorrt is None:
        use_tensorrt = importlib.util.find_spec("tensorrt") is not None
    chosen: list[Any] = []
    if use_tensorrt and TRT_EP in available:
        chosen.append((TRT_EP, {"device_id": device_id}))
    return chosen + [(CUDA_EP, {"device_id": device_id}), CPU_EP]


def require_cuda_session(session: Any) -> None:
    """MissingDependencyError unless the session really runs on CUDA (or TensorRT) EP."""
    active = list(session.get_providers())
    if CUDA_EP not in active and TRT_EP not in active:
        raise MissingDependencyError(f"the onnxruntime session runs on {', '.join(active)}, not CUDA "
                                     f"(CUDA libraries missing or a CPU-only onnxruntime): {GPU_HINT}")


def _binding_args(tensor: Tensor, placeholder: Tensor | None = None) -> dict[str, Any]:
    if tensor.dtype not in _NUMPY:
        raise UsageError(f"onnxruntime IO binding does not take {tensor.dtype} tensors: expected one of "
                         f"{', '.join(str(d) for d in _NUMPY)}")
    if not tensor.is_contiguous():
        raise UsageError("onnxruntime IO binding needs contiguous tensors: call .contiguous() first")
    return {"device_type": tensor.device.type, "device_id": tensor.device.index or 0,
            "element_type": _NUMPY[tensor.dtype], "shape": tuple(tensor.shape),
            "buffer_ptr": tensor.data_ptr() if tensor.numel() or placeholder is None else placeholder.data_ptr()}


def bind_input(binding: Any, name: str, tensor: Tensor, placeholder: Tensor | None = None) -> None:
    """Bind a torch tensor as graph input `name` by address (the tensor must stay alive until run).

    onnxruntime refuses a null address, which an empty tensor (a length-0 past) has: pass a live
    one-element `placeholder` on the same device for those."""
    a = _binding_args(tensor, placeholder)
    binding.bind_input(name, a["device_type"], a["device_id"], a["element_type"], a["shape"], a["buffer_ptr"])


def bind_output(binding: Any, name: str, tensor: Tensor, placeholder: Tensor | None = None) -> None:
    """Bind a preallocated torch tensor as graph output `name`; the run writes into it."""
    a = _binding_args(tensor, placeholder)
    binding.bind_output(name, a["device_type"], a["device_id"], a["element_type"], a["shape"], a["buffer_ptr"])


def run_bound(session: Any, inputs: Mapping[str, Tensor], outputs: Mapping[str, Tensor]) -> None:
    """Run `session` with all inputs and outputs bound to torch tensors (written in place).

    Work queued by torch on the current CUDA stream is finished first, since onnxruntime runs on
    its own stream; onnxruntime synchronizes its outputs before returning.
    """
    binding = session.io_binding()
    tensors = [*inputs.values(), *outputs.values()]
    placeholders = {t.device: torch.zeros(1, dtype=t.dtype, device=t.device) for t in tensors if not t.numel()}
    for name, tensor in inputs.items():
        bind_input(binding, name, tensor, placeholders.get(tensor.device))
    for name, tensor in outputs.items():
        bind_output(binding, name, tensor, placeholders.get(tensor.device))
    devices = {t.device for t in tensors if t.device.type == "cuda"}
    for device in devices:
        torch.cuda.current_stream(device).synchronize()
    session.run_with_iobinding(binding)
